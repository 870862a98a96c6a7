"""Embedded-runtime shim for the ranker: the version folder's tl2cgen-compiled library of
the Treelite checkpoint, inside Triton's Python backend. ``exporters.model_repo`` copies
it into every ranker version folder under this name (not ``model.py``: Python would import
``model.so`` in its place); the production runtime loads the same ``checkpoint.tl`` with
Triton's FIL backend instead.

Scores are raw margins (``pred_margin=True``), i.e. LightGBM's ``raw_score`` -- what a
lambdarank model ranks by. Tensor names and dtypes come from ``args["model_config"]``."""

from __future__ import annotations

import json
import os

import numpy as np
import tl2cgen
import triton_python_backend_utils as pb_utils


def _params(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """One tl2cgen predictor per model instance."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = _params(config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        library = os.path.join(version_dir, params.get("compiled_artifact", "model.so"))
        # Default one OpenMP thread: the machine's cores are shared with the rest of the
        # stack; the nthread parameter raises it (2 threads ~halve 500-row latency).
        nthread = int(params.get("nthread", "1"))
        self.predictor = tl2cgen.Predictor(library, nthread=nthread)
        self.num_feature = self.predictor.num_feature
        self.threshold_type = self.predictor.threshold_type
        (inp,) = config["input"]
        (out,) = config["output"]
        self.input_name = inp["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(inp["data_type"])
        self.output_name = out["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        pb_utils.Logger.log_info(
            f"{self.name}: tl2cgen {tl2cgen.__version__} library {library}, "
            f"{self.num_feature} features, {nthread} thread(s)"
        )

    def _rows(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise ValueError(f"missing input tensor {self.input_name!r}")
        rows = tensor.as_numpy()
        if rows.dtype != self.input_dtype:
            raise ValueError(
                f"input {self.input_name!r} is {rows.dtype}, expected {np.dtype(self.input_dtype)}"
            )
        if rows.ndim != 2 or rows.shape[1] != self.num_feature:
            raise ValueError(
                f"input {self.input_name!r} has shape {list(rows.shape)}, expected "
                f"[rows, {self.num_feature}] (the ranker's feature count)"
            )
        return rows

    def execute(self, requests: list) -> list:
        """Score all valid requests of a batch in one library call; a malformed request
        gets INVALID_ARG and the others are still answered."""
        responses: list = [None] * len(requests)
        valid: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self._rows(request)))
            except ValueError as e:
                responses[i] = _invalid(f"{self.name}: {e}")
        if not valid:
            return responses
        rows = valid[0][1] if len(valid) == 1 else np.concatenate([r for _, r in valid])
        try:
            dmat = tl2cgen.DMatrix(rows, dtype=self.threshold_type)
            scores = self.predictor.predict(dmat, pred_margin=True)
        except Exception as e:  # the library failed: every request of the batch says why
            for i, _ in valid:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name}: {e}", pb_utils.TritonError.INTERNAL)
                )
            return responses
        scores = scores.reshape(rows.shape[0], -1).astype(self.output_dtype, copy=False)
        offset = 0
        for i, r in valid:
            part = np.ascontiguousarray(scores[offset : offset + r.shape[0]])
            offset += r.shape[0]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, part)]
            )
        return responses

    def finalize(self) -> None:
        self.predictor = None


def _invalid(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
