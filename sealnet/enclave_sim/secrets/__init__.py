"""The trusted module's side of each protection method (one file per method), in a registry complete on import.

`open_secret` turns a bundle's unsealed (config, arrays) into the method's ModuleSecret, checking that the
secret serves the data call the signed manifest names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Complete on import: each method module registers itself.
from sealnet.enclave_sim.secrets import dsn, passport, sealed_head, transform  # noqa: F401
from sealnet.enclave_sim.secrets.base import SECRETS, ModuleSecret, register

__all__ = ["SECRETS", "ModuleSecret", "open_secret", "register"]


def open_secret(manifest: dict[str, Any], config: dict[str, Any], arrays: dict[str, np.ndarray]) -> ModuleSecret:
    """The secret of this bundle's method; ValueError when this module does not serve the method or the
    manifest's module step is not the method's."""
    method = manifest["method"]
    cls = SECRETS.get(method)
    if cls is None:
        raise ValueError(f"bundle method {method!r} is not served by this module (served: {', '.join(SECRETS)})")
    if manifest.get("module_step") != cls.step:
        raise ValueError(f"bundle manifest names module step {manifest.get('module_step')!r}; the {method} secret "
                         f"serves {cls.step!r}")
    return cls(config, arrays, manifest)
