"""`sealnet backbone make`: public backbones for `sealnet protect sealed-head`.

Torch-free at import time (the parser is built on every `sealnet` call); the commands import the rest lazily.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sealnet.protect.methods.sealed_head import BACKBONES

SOURCES = ("digits", "random")


def add_backbone_parser(sub: argparse._SubParsersAction) -> None:
    bb = sub.add_parser("backbone", help="public backbones for --method sealed-head").add_subparsers(
        dest="backbone_cmd", required=True)
    p = bb.add_parser("make", help="write backbone weights that are public by construction")
    p.add_argument("--arch", default="tap_cnn", choices=BACKBONES)
    p.add_argument("--source", default="digits", choices=SOURCES,
                   help="digits: trained only on scikit-learn's bundled 8x8 digits; random: fixed seeded init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8, help="--source digits: training epochs")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_backbone_make)


def cmd_backbone_make(args: argparse.Namespace) -> int:
    import torch

    from sealnet.protect.backbones import backbone_digest, make_public_backbone

    path = make_public_backbone(args.arch, args.seed, args.out, kind=args.source, epochs=args.epochs)
    digest = backbone_digest(torch.load(path, map_location="cpu", weights_only=True))
    print(f"backbone {args.arch} ({args.source}, seed {args.seed}): {path}  sha256 {digest}")
    return 0
