"""Embedded-runtime shim: runs a version folder's ONNX artifact with onnxruntime inside
Triton's Python backend. ``exporters.model_repo.publish_version`` copies it into every
version folder of the models whose config names it (``default_model_filename``); the
production runtime loads the same ``model.onnx`` with Triton's native
``onnxruntime_onnx`` platform instead.

Tensor names, dtypes and dims come from the model config Triton passes in
(``args["model_config"]``, i.e. ``config.pbtxt``), never from this file."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# onnxruntime's names for the tensor element types the configs use.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def choose_providers(instance_kind: str, device_id: int, available: list[str]) -> list:
    """CUDA when the instance is a GPU instance and onnxruntime has the CUDA provider,
    else the CPU. Kept free of Triton so tests can call it."""
    if instance_kind == "GPU" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _params(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.batching = config.get("max_batch_size", 0) > 0
        params = _params(config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        artifact = os.path.join(version_dir, params.get("artifact", "model.onnx"))

        options = ort.SessionOptions()
        # Two cores shared with the rest of the stack: one thread per session avoids
        # spinning thread pools; raise it per model with the intra_op_threads parameter.
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = choose_providers(
            args.get("model_instance_kind", "CPU"),
            int(args.get("model_instance_device_id", "0") or 0),
            ort.get_available_providers(),
        )
        self.session = ort.InferenceSession(artifact, options, providers=providers)
        pb_utils.Logger.log_info(
            f"{self.name}: onnxruntime {ort.__version__} providers {self.session.get_providers()}"
            f" on {args.get('model_instance_kind', 'CPU')} instance, artifact {artifact}"
        )

        ort_inputs = {i.name: i.type for i in self.session.get_inputs()}
        ort_outputs = {o.name: o.type for o in self.session.get_outputs()}
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]
        ]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]
        ]
        # A mismatch between config.pbtxt and the artifact fails the load, not a request.
        for kind, declared, actual in (
            ("input", self.inputs, ort_inputs),
            ("output", self.outputs, ort_outputs),
        ):
            for name, dtype in declared:
                if name not in actual:
                    raise pb_utils.TritonModelException(
                        f"{self.name}: {kind} {name!r} of config.pbtxt is not in {artifact} "
                        f"(it has {sorted(actual)})"
                    )
                if _ORT_TYPES.get(actual[name]) != dtype:
                    raise pb_utils.TritonModelException(
                        f"{self.name}: {kind} {name!r} is {actual[name]} in the ONNX model "
                        f"but {np.dtype(dtype).name} in config.pbtxt"
                    )
        self.output_names = [name for name, _ in self.outputs]

    def _feeds(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input tensor {name!r}")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise ValueError(f"input {name!r} is {array.dtype}, expected {np.dtype(dtype)}")
            feeds[name] = array
        return feeds

    def _response(self, results: list[np.ndarray]) -> pb_utils.InferenceResponse:
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=dtype))
            for (name, dtype), value in zip(self.outputs, results, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_one(self, feeds: dict[str, np.ndarray]) -> pb_utils.InferenceResponse:
        try:
            return self._response(self.session.run(self.output_names, feeds))
        except Exception as e:  # onnxruntime rejects bad shapes/values here
            return _invalid(f"{self.name}: {e}")

    def execute(self, requests: list) -> list:
        """Validate each request; run all valid requests of a dynamic batch as one
        onnxruntime call; answer a bad request with INVALID_ARG without failing the rest."""
        responses: list = [None] * len(requests)
        valid: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self._feeds(request)))
            except ValueError as e:
                responses[i] = _invalid(f"{self.name}: {e}")
        if len(valid) == 1 or (valid and not self.batching):
            for i, feeds in valid:
                responses[i] = self._run_one(feeds)
        elif valid:
            sizes = [next(iter(f.values())).shape[0] for _, f in valid]
            merged = {name: np.concatenate([f[name] for _, f in valid]) for name, _ in self.inputs}
            try:
                results = self.session.run(self.output_names, merged)
            except Exception:  # find the bad request(s) one by one
                for i, feeds in valid:
                    responses[i] = self._run_one(feeds)
            else:
                offsets = np.cumsum([0, *sizes])
                for (i, _), lo, hi in zip(valid, offsets[:-1], offsets[1:], strict=True):
                    responses[i] = self._response([r[lo:hi] for r in results])
        return responses

    def finalize(self) -> None:
        self.session = None


def _invalid(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
