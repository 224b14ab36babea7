"""The peer under comparison: KServe's Python model server (PyPI `kserve`) serving public.onnx with ONNX
Runtime over the same v2 gRPC protocol. Runs in its own virtualenv (.kserve-venv) because kserve pins
a protobuf release older than sealnet's; started by bench/run.py.

    .kserve-venv/bin/python sealnet/bench/kserve_server.py --onnx public.onnx --model M --grpc-port P --http-port Q
"""

from __future__ import annotations

import argparse

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = np.ascontiguousarray(payload.inputs[0].as_numpy(), dtype=np.float32)
        y = self.session.run(None, {self.input_name: x})[0]
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    args = p.parse_args()
    kserve.ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start(
        [OnnxModel(args.model, args.onnx)])
