"""CLI of the sealed-head method: `sealnet protect --method sealed-head` and `sealnet backbone make`.

Torch-free at import time (the parser is built on every `sealnet` call); the commands import the rest lazily.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BACKBONES = ("tap_cnn", "resnet18")  # protect/backbones.py registers them (checked by a test)
SOURCES = ("digits", "random")


def add_protect_sealed_head_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `sealnet protect` that only --method sealed-head reads."""
    g = p.add_argument_group("sealed-head method (--method sealed-head)")
    g.add_argument("--backbone-weights", type=Path,
                   help="state_dict of the PUBLIC backbone (never trained on your data), e.g. from `sealnet backbone "
                        "make` or torchvision resnet18 weights (fc.* is dropped)")
    g.add_argument("--backbone", choices=BACKBONES, help="backbone architecture (default: tap_cnn for 1-channel "
                                                         "data, resnet18 for 3-channel)")
    g.add_argument("--head-hidden", type=int, nargs="+", default=[256], help="hidden widths of the sealed MLP head")
    g.add_argument("--head-epochs", type=int, default=20, help="epochs over the precomputed taps")
    g.add_argument("--kd-weight", type=float, default=0.0,
                   help="share of distillation from the baseline (teacher); 0: CE only (measured best)")
    g.add_argument("--head-temperature", type=float, default=4.0, help="distillation temperature of the head")
    g.add_argument("--max-drop", type=float, default=0.015,
                   help="refuse a head whose accuracy is below baseline - this (default 0.015 = 1.5 pts)")


def cmd_protect_sealed_head(args: argparse.Namespace) -> int:
    from sealnet.data import load_dataset
    from sealnet.protect.checkpoint import save_checkpoint
    from sealnet.protect.sealed_head import SealedHeadConfig, SealedHeadTrainingError, protect_sealed_head

    if args.backbone_weights is None:
        raise SystemExit("--method sealed-head needs --backbone-weights FILE (see `sealnet backbone make`)")
    data = load_dataset(args.dataset, args.data_dir, seed=args.seed)
    arch = args.backbone or ("resnet18" if data.input_shape[0] == 3 else "tap_cnn")
    cfg = SealedHeadConfig(hidden=tuple(args.head_hidden), epochs=args.head_epochs, lr=args.lr,
                           batch_size=args.batch_size, temperature=args.head_temperature, kd_weight=args.kd_weight,
                           seed=args.seed, teacher_epochs=args.epochs, max_drop=args.max_drop)
    try:
        ckpt = protect_sealed_head(data, args.backbone_weights, arch, cfg)
    except SealedHeadTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(ckpt, args.out)
    m = ckpt.metrics
    print(f"checkpoint {args.out} (mode 0600: it holds the sealed head), backbone {arch} "
          f"sha256 {ckpt.secret['backbone_sha256'][:16]}...")
    print(f"  baseline   accuracy {m['baseline_acc']:.2%}  (unprotected network trained on the data)")
    print(f"  authorized accuracy {m['authorized_acc']:.2%}  (public backbone + sealed head, seed {ckpt.seed})")
    print(f"  FLOPs (MACs) backbone {m['backbone_flops']:,}  head {m['head_flops']:,}  "
          f"(head = {m['flops_ratio']:.1%} of the backbone)")
    return 0


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
