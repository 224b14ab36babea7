"""The sealed head, run inside the trusted module: the owner's private network over the public backbone's
features, as an in-memory ONNX graph (no torch in the trusted code), answering only what the bundle's output
policy lets out (a label by default), so that the module tells an insider no more than the endpoint tells any
licensed client."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from sealnet.bundle import CLASSIFY
from sealnet.enclave_sim.secrets.base import ModuleSecret, register
from sealnet.outputs import OutputPolicy, apply_policy, parse_policy, policy_outputs


class SealedHead:
    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray], threads: int = 1):
        self.num_classes = int(config["num_classes"])
        self.num_features = int(config["num_features"])
        # a user's model may be cut where the features are a map ([C, H, W]); sealnet's backbones give vectors
        self.features_shape = tuple(int(d) for d in config.get("features_shape", [self.num_features]))
        self.policy: OutputPolicy = parse_policy(config["policy"], self.num_classes)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(arrays["head_onnx"].tobytes(), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def outputs(self) -> list[dict[str, Any]]:
        """The output tensors the policy yields (the manifest must describe exactly these)."""
        return policy_outputs(self.policy, self.num_classes)

    def answer(self, features: np.ndarray) -> dict[str, np.ndarray]:
        logits = self._session.run(None, {self._input: features})[0]
        return apply_policy(np.asarray(logits, dtype=np.float32), self.policy)


@register
class SealedHeadSecret(ModuleSecret):
    method = "sealed-head"
    step = CLASSIFY

    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        self._head: SealedHead | None = SealedHead(config, arrays)
        if manifest.get("outputs") != self._head.outputs():
            raise ValueError(f"bundle manifest outputs do not match the sealed output policy {self._head.policy}")

    def item_shape(self, manifest: dict[str, Any]) -> tuple[int, ...]:
        return self._head.features_shape

    def classify(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return self._head.answer(features)

    def close(self) -> None:
        self._head = None
