"""The public network on ONNX Runtime in Triton's Python backend: the stand-in for Triton's onnxruntime_onnx
backend, which the pip tritonserver does not ship. Serves `1/model.onnx` of its model directory; merges the
requests Triton batched into one run. It holds nothing secret (public.onnx is what every edge host has)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from sealnet.onnx_session import ort_session


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        providers = ["auto"] if params.get("providers", "auto") == "auto" else ["CPUExecutionProvider"]
        self.session = ort_session(path, threads=int(params.get("ort_threads", "0")), providers=providers)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        merged = batches[0] if len(batches) == 1 else np.concatenate(batches)
        out = self.session.run(None, {self.input_name: merged})[0].astype("<f4", copy=False)
        parts = np.split(out, np.cumsum([len(b) for b in batches])[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, np.ascontiguousarray(p))])
                for p in parts]
