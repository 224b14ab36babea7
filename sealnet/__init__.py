"""sealnet: deploy protected neural networks behind a sealed trusted module.

Packages, one per stage of the data path: protect (train), enclave_sim (trusted module), runtime (KServe v2
endpoint), export (bundle), evaluate (evaluations that deploy bundles), attacks and bench. This package holds
what they share, and the CLIs (docs/architecture.md).
"""

__version__ = "0.1.0"
