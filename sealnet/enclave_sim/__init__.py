"""The trusted module: a sealed gRPC service over a simulated TPM keystore.

It alone holds the secret half of a protected model. It checks licenses, and applies the secret input
transform to raw inputs; the untrusted runtime never sees the secret parameters.
"""

import os
from pathlib import Path


def default_state_dir() -> Path:
    """Where the module keeps lockout and quota state, and its bytecode cache, when --state-dir is not given."""
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "sealnet" / "enclave"
