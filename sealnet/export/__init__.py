"""Split a protected checkpoint into a bundle: public network, sealed secrets, signed manifest.

This package's __init__ stays free of torch so that the CLI can build its parser quickly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sealnet.enclave_sim.keystore_spec import add_keystore_arguments
from sealnet.protect.methods.base import ExportError

__all__ = ["ExportError", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="protected checkpoint written by `sealnet protect`")
    p.add_argument("out_dir", type=Path, help="bundle directory to create")
    p.add_argument("--owner-key", type=Path, required=True, help="owner Ed25519 signing key (sealnet license keygen)")
    add_keystore_arguments(p)
    p.add_argument("--model-id", help="model id that licenses must name (default: <model>-<variant>)")
    p.add_argument("--data-dir", type=Path, help="local data for the checks when the checkpoint's dataset needs it")
    p.add_argument("--max-raw-acc", type=float, default=0.2, help="refuse to export above this raw-input accuracy")
    p.add_argument("--output-policy", metavar="POLICY",
                   help="sealed-head bundles: what the trusted module answers: label (default), topk:K or logits")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch the bundle accepts")
    p.add_argument("--tensorrt", action="store_true", help="also build public.plan (needs TensorRT and a GPU)")
    p.add_argument("--fp16", action="store_true", help="build the TensorRT engine in FP16")
    p.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
