"""What the trusted module holds for one bundle: the method's unsealed secret, as one object per method.

The module (service.py) checks the license and the session, charges the quota and audits; the secret does
the method's own work on the data call its step names (sealnet/bundle.py's MODULE_STEPS): `preprocess` a
batch, give the passport `params`, or `classify` features. It may also refuse a license its bundle does not
serve (`refusal`). Torch-free, like all the trusted module's code: it is measured (enclave_sim/measure.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from sealnet.licenses import License


class ModuleSecret:
    """Base of the per-method secrets; a subclass sets `method` and `step` and implements that step's call."""

    method: ClassVar[str]
    step: ClassVar[str]

    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        """Build from the unsealed (config, arrays); the caller zeroes `arrays` afterwards, so keep copies."""

    def refusal(self, lic: License) -> str | None:
        """Why this bundle's module does not serve a license the owner signed, or None when it does."""
        return None

    def item_shape(self, manifest: dict[str, Any]) -> tuple[int, ...]:
        """The shape of one item of the data call's tensor: the model input, unless the step says otherwise."""
        return tuple(manifest["input"]["shape"][1:])

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def classify(self, features: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the secret (best effort: ONNX Runtime's and numpy's allocators do not scrub memory)."""


SECRETS: dict[str, type[ModuleSecret]] = {}


def register(cls: type[ModuleSecret]) -> type[ModuleSecret]:
    """Class decorator: the secret class of `cls.method`'s bundles."""
    if cls.method in SECRETS:
        raise ValueError(f"secret for method {cls.method!r} registered twice")
    SECRETS[cls.method] = cls
    return cls
