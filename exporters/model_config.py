"""Read the committed ``config.pbtxt`` files: the single source of tensor names, dtypes and
dims. Exporters name ONNX inputs from them and clients build requests from them."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recstack.settings import get_settings


def config_path(model: str, repository: Path | None = None) -> Path:
    """Path of ``<repository>/<model>/config.pbtxt``."""
    return (repository or get_settings().model_repository) / model / "config.pbtxt"


def load_config(model: str, repository: Path | None = None) -> model_config_pb2.ModelConfig:
    """Parse a model's config as Triton's own ModelConfig protobuf (fails on any typo)."""
    path = config_path(model, repository)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise ValueError(f"{path}: {e}") from e


def input_names(model: str, repository: Path | None = None) -> list[str]:
    """Input tensor names in config order."""
    return [t.name for t in load_config(model, repository).input]


def output_names(model: str, repository: Path | None = None) -> list[str]:
    """Output tensor names in config order."""
    return [t.name for t in load_config(model, repository).output]
