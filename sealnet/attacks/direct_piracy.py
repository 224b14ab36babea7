"""Direct piracy (Chen & Wu, Table 3): copy the public network and run it on raw inputs, no trusted module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sealnet.bundle import PUBLIC_ONNX, load_bundle
from sealnet.onnx_session import ort_accuracy, ort_session


def direct_piracy_accuracy(bundle_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy a pirate gets from the bundle's public network on raw inputs (A1 of the threat model)."""
    bundle = load_bundle(bundle_dir)
    return ort_accuracy(ort_session(bundle.path(PUBLIC_ONNX)), x, y)
