"""Protection methods: one object each, in one registry that is complete on import.

A method knows how to train (its `sealnet protect NAME` flags and command), how to split its checkpoint into
a bundle (the public ONNX it ships and the secret part it seals), which data call the trusted module serves for
its bundles (`module_step`, written into the manifest so the torch-free runtime never asks for the method's
name) and what the demo runs. What the trusted module does with the secret lives in
`sealnet/enclave_sim/secrets/NAME.py`. Adding a method: one file here, one there (docs/architecture.md).

Importing this package imports no torch: the CLI builds every method's parser on each call. Methods import
their training and export code inside the functions that need it.
"""

# Complete on import: each method module registers itself, in this order (the CLI's, the attack suite's).
from sealnet.protect.methods import transform  # noqa: F401, I001
from sealnet.protect.methods import passport  # noqa: F401
from sealnet.protect.methods import dsn  # noqa: F401
from sealnet.protect.methods import watermark  # noqa: F401
from sealnet.protect.methods import sealed_head  # noqa: F401
from sealnet.protect.methods.base import (
    METHODS,
    DemoPlan,
    ExportError,
    ExportOptions,
    ProtectionMethod,
    exportable,
    get_method,
    register,
    with_demo,
)

__all__ = ["METHODS", "DemoPlan", "ExportError", "ExportOptions", "ProtectionMethod", "exportable", "get_method",
           "register", "with_demo"]
