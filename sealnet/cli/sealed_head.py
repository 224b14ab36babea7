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


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    from sealnet.data import add_data_arguments
    from sealnet.protect.user_args import add_model_arguments

    p = sub.add_parser("inspect", help="list where your model can be split (--split-at names, shapes, MACs)")
    add_model_arguments(p)
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="the model's input (torch models; default: from --data or the model's config)")
    p.add_argument("--num-classes", type=int, help="check the model outputs this many scores")
    add_data_arguments(p, default=None)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from sealnet.errors import InvalidArgument
    from sealnet.protect.user_args import model_image_defaults
    from sealnet.protect.user_model import open_user_model

    if not args.model:
        raise InvalidArgument("sealnet inspect needs --model MODEL")
    shape, classes = args.input_shape, args.num_classes
    if args.dataset and shape is None:
        from sealnet.data import ImageOptions, image_options, load_dataset

        size = ImageOptions(image_size=model_image_defaults(args.model).image_size)  # shapes only: no normalising
        data = load_dataset(args.dataset, args.data_dir, options=image_options(args, size))
        shape, classes = data.input_shape, classes or data.num_classes
    user = open_user_model(args.model, input_shape=tuple(shape) if shape else None, num_classes=classes,
                           weights=args.weights)
    default = user.default_cut()
    chosen = user.find_cut(args.split_at) if args.split_at else None  # an unknown name lists the valid ones
    cuts = user.cuts()
    print(f"{user.spec}: input {list(user.input_shape)}, {user.num_outputs} outputs; {len(cuts)} places to split "
          "(public part = up to and including NAME; sealed head = the rest)")
    width = max(len("NAME"), *(len(c.name) for c in cuts))
    print(f"  {'NAME':<{width}}  {'OUTPUT SHAPE':<16} {'PUBLIC MACs':>14} {'HEAD MACs':>14} {'HEAD SHARE':>10}")
    for c in cuts:
        mark = "  <- --split-at" if c == chosen else "  <- default" if c == default else ""
        print(f"  {c.name:<{width}}  {str(list(c.shape)):<16} {c.public_macs:>14,} {c.head_macs:>14,} "
              f"{c.head_share:>10.1%}{mark}")
    print(f"use: sealnet protect sealed-head --model {args.model} --split-at NAME --data ...")
    return 0
