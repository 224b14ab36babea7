"""Exporting a protected network to ONNX, shared by the methods' splits (sealnet/protect/methods/).

A split writes public.onnx, checks that it is useless alone and right with the secret, and returns the secret
part as (config, arrays) for the trusted module; sealnet/export/build_engine.py seals it and signs the manifest.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sealnet.data import Dataset
from sealnet.errors import ExportError
from sealnet.onnx_session import ort_accuracy, ort_session
from sealnet.protect.checkpoint import ProtectedCheckpoint, tensor_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_ONNX_DIFF = 1e-3


def export_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path | io.BytesIO,
                input_names: list[str], opset: int = 17, fold: bool = True, output_name: str = OUTPUT_NAME) -> None:
    """Export with a dynamic batch dimension on the first input (TorchScript exporter: no extra dependencies).

    `fold=False` keeps every weight under its parameter name (no normalisation folded into convolutions;
    ONNX Runtime fuses them when it loads the graph, so inference costs the same). A BytesIO target keeps the
    graph off the disk (the sealed head)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), args, path if isinstance(path, io.BytesIO) else str(path), dynamo=False,
            opset_version=opset, do_constant_folding=fold, input_names=input_names, output_names=[output_name],
            dynamic_axes={input_names[0]: {0: "batch"}, output_name: {0: "batch"}},
        )


def check_diff(got: np.ndarray, reference: np.ndarray) -> float:
    diff = float(np.abs(got - reference).max())
    if diff > MAX_ONNX_DIFF:
        raise ExportError(f"ONNX output differs from torch by {diff:.2e} (> {MAX_ONNX_DIFF}); not exporting")
    return diff


def gate(public_acc: float, max_raw_acc: float, what: str) -> None:
    if public_acc > max_raw_acc:
        raise ExportError(f"the public network reaches {public_acc:.1%} {what} (> --max-raw-acc {max_raw_acc:.0%}): "
                          "it would be useful to a pirate without the trusted module; retrain it")


def export_public_network(ckpt: ProtectedCheckpoint, data: Dataset, processed: np.ndarray, onnx_path: Path,
                           max_raw_acc: float, log: Callable[[str], None], processed_label: str, raw_gate: str
                           ) -> dict[str, Any]:
    """For methods whose trusted module processes the inputs (transform, DSN stamp): export the checkpoint's
    public network as is, compare it with torch on `processed` (the test split as the module returns it), and
    measure and gate its accuracy on raw inputs."""
    if ckpt.user_model:  # a user's network: the ONNX bytes protect exported and checked against torch
        onnx_path.write_bytes(tensor_bytes(ckpt.public_onnx))
        session = ort_session(onnx_path)
        diff = float(ckpt.metrics["onnx_max_abs_diff"])
    else:
        model = ckpt.build_public_model()
        export_onnx(model, (torch.zeros(1, *ckpt.input_shape),), onnx_path, [INPUT_NAME])
        session = ort_session(onnx_path)
        with torch.no_grad():
            reference = model(torch.from_numpy(processed[:256])).numpy()
        diff = check_diff(session.run(None, {INPUT_NAME: processed[:256]})[0], reference)
    checks = {"onnx_max_abs_diff": diff, "public_raw_acc": ort_accuracy(session, data.x_test, data.y_test),
              "authorized_acc": ort_accuracy(session, processed, data.y_test)}
    log(f"public.onnx: max |onnx - torch| = {diff:.2e}; raw-input accuracy {checks['public_raw_acc']:.1%} "
        f"({processed_label} {checks['authorized_acc']:.1%})")
    gate(checks["public_raw_acc"], max_raw_acc, raw_gate)
    return checks


FEATURES_NAME = "features"
