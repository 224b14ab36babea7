"""The Deep Serial Number in the trusted module: it stamps inputs with the student's serial-number pattern, for
the student's own customer and serial number only (a student answers one customer)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sealnet.bundle import PREPROCESS
from sealnet.enclave_sim.secrets.base import ModuleSecret, register
from sealnet.licenses import License
from sealnet.stamp import StampSpec, as_pattern


@register
class DSNSecret(ModuleSecret):
    method = "dsn"
    step = PREPROCESS

    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        self._stamp: StampSpec | None = StampSpec(as_pattern(arrays["pattern"].round().astype(np.uint8)),
                                                  tuple(config["position"]), int(config["scale"]))
        self._required = (config["customer_id"], config["serial_number"])

    def refusal(self, lic: License) -> str | None:
        if (lic.customer_id, lic.serial_number) == self._required:
            return None
        return (f"serial number {lic.serial_number!r} of customer {lic.customer_id!r} does not match this model's "
                "serial number (a student answers only its own customer)")

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        return self._stamp.apply(batch)

    def close(self) -> None:
        self._stamp = None
