"""ONNX Runtime sessions as sealnet runs them (no torch import: the runtime does not need it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def ort_session(path: Path | bytes, threads: int = 0, providers: list[str] | None = None):
    """A session with full graph optimisation, from a file or serialized model bytes; `providers=None` means
    CPU only, `["auto"]` picks TensorRT / CUDA when this onnxruntime build and machine have them."""
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
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def session_from_model(model, threads: int = 0, providers: list[str] | None = None):
    """A session over an in-memory onnx.ModelProto (e.g. public.onnx with passport parameters filled in):
    the completed network never touches the disk."""
    return ort_session(model.SerializeToString(), threads=threads, providers=providers)


def param_names(n_layers: int) -> list[str]:
    """Names of the public ONNX initializers the trusted module's gamma/beta replace, layer by layer."""
    return [f"{k}_{i}" for i in range(n_layers) for k in ("gamma", "beta")]


def with_params(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose gamma/beta initializers hold `params` (shapes must match)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in params:
            value = np.asarray(params[init.name], dtype=np.float32)
            if tuple(init.dims) != value.shape:
                raise ValueError(f"{init.name}: shape {value.shape}, the network expects {tuple(init.dims)}")
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def ort_accuracy(session, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    name = session.get_inputs()[0].name
    # outputs of any rank are read as flat scores (a public part that ends in a feature map)
    preds = [session.run(None, {name: x[i : i + batch_size]})[0].reshape(len(x[i : i + batch_size]), -1).argmax(1)
             for i in range(0, len(x), batch_size)]
    return float((np.concatenate(preds) == y).mean())
