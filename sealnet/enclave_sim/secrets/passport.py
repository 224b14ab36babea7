"""Digital passports in the trusted module (scheme V1): gamma = Avg(W * P_gamma), beta = Avg(W * P_beta).

Computed once, at start, from the unsealed passports and the sealed copy of each passport layer's weight
(the passport method's split writes both). The mean over output positions of a convolution equals the kernel applied to
the mean input window, so each parameter is one contraction; numpy only, no torch in the trusted module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sealnet.bundle import PARAMS
from sealnet.enclave_sim.secrets.base import ModuleSecret, register


def mean_conv_response(passport: np.ndarray, weight: np.ndarray, stride: list[int], padding: list[int]) -> np.ndarray:
    """mean_{h,w} conv2d(passport, weight, stride, padding) for one (C, H, W) passport -> (C_out,)."""
    if passport.ndim != 3 or weight.ndim != 4 or passport.shape[0] != weight.shape[1]:
        raise ValueError(f"passport {passport.shape} does not fit a convolution weight {weight.shape}")
    kh, kw = weight.shape[2:]
    padded = np.pad(passport.astype(np.float64), ((0, 0), (padding[0],) * 2, (padding[1],) * 2))
    windows = sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, :: stride[0], :: stride[1]]
    if windows.shape[1] == 0 or windows.shape[2] == 0:
        raise ValueError(f"passport {passport.shape} is smaller than the kernel {weight.shape[2:]}")
    return np.einsum("cij,ocij->o", windows.mean(axis=(1, 2)), weight.astype(np.float64))


def derive_params(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{gamma_i, beta_i: float32 (C_out,)} for every sealed passport layer (see sealnet/protect/methods/passport.py)."""
    params: dict[str, np.ndarray] = {}
    for spec in config["layers"]:
        layer = spec["layer"]
        weight = arrays[f"{layer}/weight"]
        for key in ("gamma", "beta"):
            source = arrays[f"{layer}/{key}"]
            if spec[f"{key}_from"] == "constant":
                value = source
            elif spec["kind"] == "conv":
                value = mean_conv_response(source, weight, spec["stride"], spec["padding"])
            elif spec["kind"] == "linear":
                value = weight.astype(np.float64) @ source.reshape(-1).astype(np.float64)
            else:
                raise ValueError(f"sealed passport layer {layer}: unknown kind {spec['kind']!r}")
            if value.shape != (weight.shape[0],):
                raise ValueError(f"sealed passport layer {layer}: {key} has shape {value.shape}")
            params[spec[key]] = np.ascontiguousarray(value, dtype="<f4")
    return params


@register
class PassportSecret(ModuleSecret):
    """The derived gamma/beta, computed once at start; the passports themselves are not kept."""

    method = "passport"
    step = PARAMS

    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        self._params: dict[str, np.ndarray] | None = derive_params(config, arrays)

    def params(self) -> dict[str, np.ndarray]:
        return self._params

    def close(self) -> None:
        if self._params is not None:
            for array in self._params.values():
                array.fill(0)
            self._params = None
