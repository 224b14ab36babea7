"""A small KServe v2 client (`sealnet infer`), using only sealnet's own stubs."""

from __future__ import annotations

import time

import grpc
import numpy as np

from sealnet._grpc import inference_pb2, inference_pb2_grpc
from sealnet.outputs import predicted_labels
from sealnet.rpc import LICENSE_METADATA, MAX_MESSAGE_BYTES
from sealnet.runtime.enclave_client import channel_target


class InferenceClient:
    def __init__(self, address: str, model: str, *, timeout: float = 30.0):
        self.model = model
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            channel_target(address), options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                              ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports ready (trusted module reachable), else raise TimeoutError."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self._stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready (is the trusted module running?)")

    def infer_outputs(self, batch: np.ndarray, license_token: str | None,
                      input_name: str = "input") -> dict[str, np.ndarray]:
        """Every output tensor of the answer, by name (logits; or label / classes+probs of a sealed head)."""
        batch = np.ascontiguousarray(batch, dtype="<f4")
        req = inference_pb2.ModelInferRequest(model_name=self.model)
        req.inputs.add(name=input_name, datatype="FP32", shape=list(batch.shape))
        req.raw_input_contents.append(batch.tobytes())
        metadata = [(LICENSE_METADATA, license_token)] if license_token else None
        resp = self._stub.ModelInfer(req, timeout=self.timeout, metadata=metadata)
        return {out.name: np.frombuffer(raw, dtype=_DTYPES[out.datatype]).reshape(tuple(out.shape))
                for out, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}

    def infer(self, batch: np.ndarray, license_token: str | None, input_name: str = "input") -> np.ndarray:
        """The first output tensor (the logits, for every method but a sealed head under a label/top-k policy)."""
        return next(iter(self.infer_outputs(batch, license_token, input_name).values()))

    def predict_labels(self, batch: np.ndarray, license_token: str | None) -> np.ndarray:
        """Predicted classes [N], whatever the bundle's outputs are."""
        return predicted_labels(self.infer_outputs(batch, license_token))


_DTYPES = {"FP32": "<f4", "INT64": "<i8"}
