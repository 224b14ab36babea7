"""The anti-piracy input transform (Chen & Wu): the public network is accurate only on inputs that went
through the secret transform (Fixed / Learned / Generator perturbation), which the trusted module applies."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sealnet.bundle import PREPROCESS
from sealnet.processes import DEMO_MODEL_ID
from sealnet.protect import VARIANTS
from sealnet.protect.methods.base import DemoPlan, ExportOptions, ProtectionMethod, Split, register

if TYPE_CHECKING:
    from sealnet.data import Dataset
    from sealnet.protect.checkpoint import ProtectedCheckpoint


@register
class Transform(ProtectionMethod):
    name = "transform"
    summary = "anti-piracy input transform (Chen & Wu): the module perturbs inputs before the public network"
    module_step = PREPROCESS
    attack_module = "sealnet.attacks.transform_attacks"
    user_model_refusal = None  # a torch model; protect says why an .onnx file cannot be retrained here

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--variant", default="generator", choices=VARIANTS)
        parser.add_argument("--alpha", type=float, default=1.0, help="weight of CE on processed inputs")
        parser.add_argument("--beta", type=float, default=1.0,
                            help="weight of the true-class probability on raw inputs")
        parser.add_argument("--gamma", type=float, default=0.01, help="weight of ||x_p - x_r||^2")

    def protect(self, args: argparse.Namespace) -> int:
        from sealnet.data import load_data_from_args
        from sealnet.protect.pipeline import protect_transform
        from sealnet.protect.train import TrainConfig

        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          alpha=args.alpha, beta=args.beta, gamma=args.gamma)
        user = None
        if args.model:
            from sealnet.protect.user_args import user_data_and_model
            from sealnet.protect.user_model import ModelError, TorchUserModel

            if args.split_at:
                raise ModelError("--split-at applies to sealed-head; the transform keeps the whole network public")
            data, user, _ = user_data_and_model(args, seed=args.seed)
            if not isinstance(user, TorchUserModel):
                raise ModelError("the transform retrains the whole network on transformed inputs: give a torch "
                                 "model (FILE.py:FACTORY or timm:NAME), not an .onnx file (sealed-head takes one)")
        else:
            data = load_data_from_args(args, seed=args.seed)
        ckpt = protect_transform(data, args.variant, args.out, cfg, baseline=not args.no_baseline, user=user)
        m = ckpt.metrics
        print(f"checkpoint {args.out} (mode 0600: it holds the secret transform)")
        if "baseline_acc" in m:
            print(f"  baseline   accuracy {m['baseline_acc']:.2%}")
        print(f"  authorized accuracy {m['authorized_acc']:.2%}  (raw input through the {args.variant} transform)")
        print(f"  raw        accuracy {m['raw_acc']:.2%}  (raw input, no transform: what a pirate gets)")
        return 0

    def split(self, ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, options: ExportOptions,
              log: Callable[[str], None]) -> Split:
        """public.onnx is the network trained on transformed inputs; the transform is sealed."""
        import torch

        from sealnet.protect.onnx_export import export_public_network
        from sealnet.protect.transform import transform_to_arrays

        transform = ckpt.build_transform()
        with torch.no_grad():
            processed = transform(torch.from_numpy(data.x_test)).numpy()
        checks = export_public_network(ckpt, data, processed, onnx_path, options.max_raw_acc, log, "authorized",
                                       "on raw inputs")
        config, arrays = transform_to_arrays(transform, ckpt.input_shape)
        return Split(config, arrays, checks, {"variant": ckpt.secret["variant"]})

    def example_commands(self, work: Path, seed: int, out: Path) -> list[list[str]]:
        return [["protect", self.name, "--variant", "generator", "--seed", str(seed), "--out", str(out)]]

    def model_id_suffix(self, ckpt: ProtectedCheckpoint) -> str:
        return ckpt.secret["variant"]

    def demo(self) -> DemoPlan:
        return DemoPlan(DEMO_MODEL_ID, "owner: train the baseline and the Generator-protected model on the embedded "
                        "MNIST subset", _train_demo)


def _train_demo(data: Dataset, workdir: Path, epochs: int, seed: int) -> ProtectedCheckpoint:
    from sealnet.protect.pipeline import protect_transform
    from sealnet.protect.train import TrainConfig

    return protect_transform(data, "generator", workdir / "protected.pt", TrainConfig(epochs=epochs, seed=seed))
