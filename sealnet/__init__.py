"""sealnet: deploy protected neural networks behind a sealed trusted module.

Packages, one per stage of the data path: protect (train), export (bundle), enclave_sim (trusted module),
runtime (KServe v2 endpoint), attacks (security testers). This package holds what they share.
"""

__version__ = "0.1.0"
