"""The command-line side of models users bring (`--model`, `--weights`, `--split-at`): flags shared by
`protect`, `demo` and `inspect`, and what they resolve to. Torch-free on import, like every parser."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sealnet.data import Dataset, ImageOptions
    from sealnet.protect.user_model import UserModel

MODEL_SPEC_HELP = "FILE.py:FACTORY (a function returning an nn.Module), timm:NAME, or FILE.onnx"


def add_model_arguments(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("--model", metavar="MODEL", help=f"your network: {MODEL_SPEC_HELP}")
    parser.add_argument("--weights", type=Path, help="state_dict for --model (.pt / .pth / .safetensors)")
    parser.add_argument("--split-at", metavar="NAME",
                        help="where the public part ends: a module path (torch, e.g. layer4) or a tensor name "
                             "(ONNX); `sealnet inspect --model ...` lists them (default: before the classifier)")


def model_image_defaults(spec: str) -> ImageOptions:
    """Input size and normalisation from the model's own config (timm's pretrained_cfg), where it has one."""
    from sealnet.data import ImageOptions

    kind, _, name = spec.partition(":")
    if kind != "timm":
        return ImageOptions()
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        return ImageOptions()  # open_user_model names the missing package
    import timm

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return ImageOptions()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    size = cfg.get("input_size")
    return ImageOptions(image_size=tuple(size[1:]) if size else None,
                        mean=tuple(cfg["mean"]) if cfg.get("mean") else None,
                        std=tuple(cfg["std"]) if cfg.get("std") else None)


def user_data_and_model(args: argparse.Namespace, seed: int) -> tuple[Dataset, UserModel, Dataset | None]:
    """The private data, the user's model (checked against it) and the optional public data, from the flags.
    A user's data is split by a fixed seed (0), as the export splits it: the training seed changes the
    training, never which images are held out."""
    from sealnet.data import ImageOptions, image_options, load_dataset
    from sealnet.protect.user_model import open_user_model

    defaults = model_image_defaults(args.model)
    opts = image_options(args, ImageOptions(image_size=defaults.image_size))
    data = load_dataset(args.dataset, args.data_dir, seed=0, options=opts)
    channels = data.input_shape[0]
    if (opts.mean is None and opts.std is None and defaults.mean is not None
            and len(defaults.mean) == channels and len(defaults.std or ()) == channels):
        opts = ImageOptions(opts.image_size, defaults.mean, defaults.std)  # the model's own normalisation
        data = load_dataset(args.dataset, args.data_dir, seed=0, options=opts)
    user = open_user_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes,
                           weights=args.weights, seed=seed)
    public_data = None
    if getattr(args, "public_data", None):
        public_data = load_dataset(args.public_data, args.data_dir, seed=0,
                                   options=ImageOptions(tuple(data.input_shape[1:]), opts.mean, opts.std))
    return data, user, public_data


@dataclass(frozen=True)
class UserModelChoice:
    """What `sealnet demo --model ...` was asked to protect: the flags of add_model_arguments and
    add_data_arguments (read by user_data_and_model like a parsed namespace) plus the head's training."""

    model: str
    dataset: str
    weights: Path | None = None
    split_at: str | None = None
    data_dir: Path | None = None
    image_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    public_data: str | None = None
    public_epochs: int = 8
    head_epochs: int = 20
    max_drop: float = 0.02

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UserModelChoice | None:
        """None when no --model was given (then --data, which only a user's model reads, is refused)."""
        from sealnet.errors import InvalidArgument

        if not getattr(args, "model", None):
            if getattr(args, "dataset", None):
                raise InvalidArgument("--data names the data for your --model; give --model too")
            return None
        if not args.dataset:
            raise InvalidArgument("--model needs --data (imagefolder:DIR, npz:FILE or a built-in dataset)")
        return cls(model=args.model, dataset=args.dataset, weights=args.weights, split_at=args.split_at,
                   data_dir=args.data_dir, image_size=args.image_size, mean=args.mean, std=args.std,
                   public_data=args.public_data, public_epochs=args.public_epochs, head_epochs=args.head_epochs,
                   max_drop=args.max_drop)
