"""ONNX Runtime sessions as sealnet runs them (no torch import: the runtime does not need it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def ort_session(path: Path, threads: int = 0, providers: list[str] | None = None):
    """A session with full graph optimisation; `providers=None` means CPU only, `["auto"]` picks TensorRT /
    CUDA when this onnxruntime build and machine have them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # Idle intra-op threads spin by default; between a server's many small runs that spinning burns a core
    # that the trusted module, the gRPC threads and the other runs need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if providers == ["auto"]:
        available = ort.get_available_providers()
        providers = [p for p in ACCELERATED_PROVIDERS if p in available] + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def ort_accuracy(session, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    name = session.get_inputs()[0].name
    preds = [session.run(None, {name: x[i : i + batch_size]})[0].argmax(1) for i in range(0, len(x), batch_size)]
    return float((np.concatenate(preds) == y).mean())
