"""Shared by the deploy tests: the Dockerfiles read as instructions and stages, and the
flags the project starts tritonserver with (orchestrator/triton_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

from recstack.settings import Settings


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name (or index) -> its instructions, FROM included."""
    out: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for word, args in instructions(dockerfile):
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(out))
            out[name] = []
        out[name].append((word, args))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def triton_flags(argv: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--"))


def embedded_triton_flags() -> dict[str, str]:
    """The flags orchestrator/triton_server.py starts tritonserver with (a fixed key, so
    nothing is written)."""
    from orchestrator.triton_server import triton_argv

    settings = Settings(triton_repository_key="k")
    return triton_flags(triton_argv(settings, Path("/backends"), Path("/site")))


# Flags whose value differs in a container on purpose: paths, listen addresses (Triton's
# default is every interface), and the repository-API key (from a Secret in Kubernetes).
CONTAINER_SPECIFIC = {
    "model-repository",
    "backend-directory",
    "http-address",
    "grpc-address",
    "metrics-address",
    "http-restricted-api",
    "grpc-restricted-protocol",
}
