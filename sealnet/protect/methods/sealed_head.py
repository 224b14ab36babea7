"""The sealed head: the public file is a backbone that never saw the owner's data (its weights are exactly the
published ones); everything learnt from the data is a head that only the trusted module runs, after the
public network, answering under the manifest's output policy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sealnet.bundle import CLASSIFY
from sealnet.errors import InvalidArgument
from sealnet.processes import SEALED_HEAD_DEMO_MODEL_ID
from sealnet.protect.methods.base import DemoPlan, ExportOptions, ProtectionMethod, Split, register

if TYPE_CHECKING:
    import torch

    from sealnet.data import Dataset
    from sealnet.protect.checkpoint import ProtectedCheckpoint
    from sealnet.protect.user_args import UserModelChoice

BACKBONES = ("tap_cnn", "resnet18")  # protect/backbones.py registers them (checked by a test)


@register
class SealedHead(ProtectionMethod):
    name = "sealed-head"
    summary = "sealed head (public backbone, private head run by the module): a copy is worth black-box access"
    user_model_refusal = None
    module_step = CLASSIFY
    takes_output_policy = True
    baseline_option = False  # the baseline is the head's accuracy floor: always trained

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backbone-weights", type=Path,
                            help="state_dict of the PUBLIC backbone (never trained on your data), e.g. from "
                                 "`sealnet backbone make` or torchvision resnet18 weights (fc.* is dropped)")
        parser.add_argument("--backbone", choices=BACKBONES,
                            help="backbone architecture (default: tap_cnn for 1-channel data, resnet18 for 3-channel)")
        parser.add_argument("--head-hidden", type=int, nargs="+", default=[256],
                            help="hidden widths of the sealed MLP head")
        parser.add_argument("--head-epochs", type=int, default=20, help="epochs over the precomputed taps")
        parser.add_argument("--kd-weight", type=float, default=0.0,
                            help="share of distillation from the baseline (teacher); 0: CE only (measured best)")
        parser.add_argument("--head-temperature", type=float, default=4.0,
                            help="distillation temperature of the head")
        parser.add_argument("--max-drop", type=float, default=0.015,
                            help="refuse a head whose accuracy is below baseline - this (default 0.015 = 1.5 pts)")
        group = parser.add_argument_group("with --model (your own network, instead of --backbone)")
        group.add_argument("--public-data", metavar="DATA",
                           help="pretrain the public part on these (public) images only, e.g. digits; default: "
                                "it keeps the --model / --weights weights as they are")
        group.add_argument("--public-epochs", type=int, default=8, help="epochs of --public-data pretraining")
        group.add_argument("--tune-public", action="store_true",
                           help="fine-tune the public part on the private data too (NOT recommended: public.onnx "
                                "then carries what it learnt; the export and attack report say so)")

    def protect(self, args: argparse.Namespace) -> int:
        from sealnet.data import load_data_from_args

        if args.model:
            return _protect_user(args)
        from sealnet.protect.checkpoint import save_checkpoint
        from sealnet.protect.sealed_head import SealedHeadConfig, SealedHeadTrainingError, protect_sealed_head

        if args.backbone_weights is None:
            raise InvalidArgument("sealnet protect sealed-head needs --backbone-weights FILE (see `sealnet backbone "
                                  "make`), or --model for a network of your own (docs/byo.md)")
        data = load_data_from_args(args, seed=args.seed)
        arch = args.backbone or ("resnet18" if data.input_shape[0] == 3 else "tap_cnn")
        cfg = SealedHeadConfig(hidden=tuple(args.head_hidden), epochs=args.head_epochs, lr=args.lr,
                               batch_size=args.batch_size, temperature=args.head_temperature,
                               kd_weight=args.kd_weight, seed=args.seed, teacher_epochs=args.epochs,
                               max_drop=args.max_drop)
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

    def example_commands(self, work: Path, seed: int, out: Path) -> list[list[str]]:
        weights = str(work / "backbone.pt")
        return [["backbone", "make", "--source", "digits", "--seed", str(seed), "--out", weights],
                ["protect", self.name, "--backbone-weights", weights, "--seed", str(seed), "--out", str(out)]]

    def split(self, ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, options: ExportOptions,
              log: Callable[[str], None]) -> Split:
        if options.output_policy is not None:
            ckpt.secret["output_policy"] = options.output_policy
        return _split_user(ckpt, data, onnx_path, log) if ckpt.user_model else _split(ckpt, data, onnx_path, log)

    def demo(self) -> DemoPlan:
        return DemoPlan(SEALED_HEAD_DEMO_MODEL_ID, "owner: a public backbone trained only on public data "
                        "(scikit-learn's 8x8 digits, upscaled), then the baseline and the sealed head on the frozen "
                        "backbone's taps (embedded MNIST)", _train_demo, stealing=True, train_user=_train_user_demo)


def _protect_user(args: argparse.Namespace) -> int:
    from sealnet.protect.checkpoint import save_checkpoint
    from sealnet.protect.sealed_head import UserHeadConfig
    from sealnet.protect.user_args import user_data_and_model

    if args.backbone_weights is not None or args.backbone is not None:
        raise InvalidArgument("--model replaces --backbone / --backbone-weights; give one or the other")
    data, user, public_data = user_data_and_model(args, seed=args.seed)
    cfg = UserHeadConfig(epochs=args.head_epochs, baseline_epochs=args.epochs, public_epochs=args.public_epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_drop=args.max_drop,
                         tune_public=args.tune_public)
    ckpt = train_user_head(user, data, cfg, args.split_at, public_data)
    save_checkpoint(ckpt, args.out)
    _print_user_result(ckpt, args.out)
    return 0


def train_user_head(user, data: Dataset, cfg, split_at: str | None, public_data: Dataset | None
                    ) -> ProtectedCheckpoint:
    """Split the user's model and train its sealed head (protect/sealed_head.py); the checkpoint, not written."""
    from sealnet.protect.sealed_head import protect_user_sealed_head

    split = user.split(split_at)
    print(f"{user.spec}: public part up to {split.cut.name!r} (features {list(split.features_shape)}), sealed head "
          f"= the rest ({split.cut.head_share:.1%} of the MACs)", file=sys.stderr)
    return protect_user_sealed_head(split, data, cfg, public_data=public_data)


def _print_user_result(ckpt: ProtectedCheckpoint, out: Path) -> None:
    m = ckpt.metrics
    print(f"checkpoint {out} (mode 0600: it holds the sealed head), {ckpt.model_config['source']} split at "
          f"{ckpt.model_config['split_at']!r}, public weights sha256 {ckpt.secret['backbone_sha256'][:16]}...")
    print(f"  baseline   accuracy {m['baseline_acc']:.2%}  (the whole network fine-tuned on the data)")
    print(f"  authorized accuracy {m['authorized_acc']:.2%}  (public part + sealed head, seed {ckpt.seed})")
    print(f"  MACs public {m['backbone_flops']:,}  head {m['head_flops']:,}  (head = {m['head_share']:.1%} of all)")
    if ckpt.secret.get("public_trained_on_private_data"):
        print("  WARNING: the public part was fine-tuned on the private data (--tune-public): a copy of "
              "public.onnx is worth more than black-box access; `sealnet attack` measures how much")


def _train_user_demo(choice: UserModelChoice, workdir: Path, epochs: int, seed: int
                     ) -> tuple[Dataset, ProtectedCheckpoint]:
    from sealnet.protect.checkpoint import save_checkpoint
    from sealnet.protect.sealed_head import UserHeadConfig
    from sealnet.protect.user_args import user_data_and_model

    data, user, public_data = user_data_and_model(choice, seed=seed)
    cfg = UserHeadConfig(epochs=choice.head_epochs, baseline_epochs=epochs, public_epochs=choice.public_epochs,
                         seed=seed, max_drop=choice.max_drop)
    ckpt = train_user_head(user, data, cfg, choice.split_at, public_data)
    save_checkpoint(ckpt, Path(workdir) / "protected.pt")
    _print_user_result(ckpt, Path(workdir) / "protected.pt")
    return data, ckpt


def _train_demo(data: Dataset, workdir: Path, epochs: int, seed: int) -> ProtectedCheckpoint:
    from sealnet.protect.sealed_head import protect_demo_sealed_head

    return protect_demo_sealed_head(data, workdir, epochs=epochs, seed=seed)


def _published_weights_check(onnx_path: Path, state: dict[str, torch.Tensor], digest: str) -> None:
    """public.onnx must hold exactly the published backbone's weights and no other weight: recompute the
    published digest from its initializers, and refuse any other floating-point tensor in the graph."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from sealnet.protect.backbones import backbone_digest
    from sealnet.protect.methods.base import ExportError

    if backbone_digest(state) != digest:
        raise ExportError("the checkpoint's backbone weights differ from the published backbone they name "
                          f"(sha256 {digest[:16]}...); re-run `sealnet protect` with the published weights file")
    graph = onnx.load(str(onnx_path)).graph
    shipped = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shipped.update({f"constant:{n.output[0]}": numpy_helper.to_array(a.t) for n in graph.node
                    if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    rebuilt = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        value = shipped.get(name)
        if value is None:  # the exporter keeps one copy of equal tensors (e.g. fresh BatchNorm ones) under one name
            value = next((shipped[other] for other in state if other in shipped
                          and shipped[other].shape == tuple(tensor.shape)
                          and np.array_equal(shipped[other], tensor.numpy())), None)
        if value is None:
            raise ExportError(f"public.onnx does not hold the backbone weight {name!r}")
        rebuilt[name] = torch.from_numpy(np.array(value, dtype=tensor.numpy().dtype, copy=True))
    if backbone_digest(rebuilt) != digest:
        raise ExportError("public.onnx weights differ from the published backbone's (sha256 mismatch); not exporting")
    extra = sorted(n for n, a in shipped.items() if n not in state and a.dtype.kind == "f" and a.size > 1)
    if extra:
        raise ExportError(f"public.onnx carries tensors that are not published backbone weights: {extra[:5]}")


def _split(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, log: Callable[[str], None]) -> Split:
    """Sealed head: public.onnx is the published backbone exactly as given (features out); the head, trained on
    the owner's data, is sealed as an ONNX graph that only the trusted module runs, under an output policy."""
    import io

    import numpy as np
    import torch

    from sealnet.onnx_session import ort_accuracy, ort_session
    from sealnet.outputs import DEFAULT_POLICY, parse_policy
    from sealnet.protect.onnx_export import FEATURES_NAME, INPUT_NAME, check_diff, export_onnx

    policy = parse_policy(ckpt.secret.get("output_policy", DEFAULT_POLICY), ckpt.num_classes)
    backbone, head = ckpt.build_public_model(), ckpt.build_head()
    export_onnx(backbone, (torch.zeros(1, *ckpt.input_shape),), onnx_path, [INPUT_NAME], fold=False,
                output_name=FEATURES_NAME)
    digest = ckpt.secret["backbone_sha256"]
    _published_weights_check(onnx_path, ckpt.public_state, digest)
    with torch.no_grad():
        features = backbone(torch.zeros(1, *ckpt.input_shape))
    buffer = io.BytesIO()
    export_onnx(head, (features,), buffer, [FEATURES_NAME])
    head_bytes = buffer.getvalue()

    public, sealed = ort_session(onnx_path), ort_session(head_bytes)
    x, y = data.x_test, data.y_test
    feats = np.concatenate([public.run(None, {INPUT_NAME: x[i : i + 500]})[0] for i in range(0, len(x), 500)])
    logits = sealed.run(None, {FEATURES_NAME: feats})[0]
    with torch.no_grad():
        reference = head(backbone(torch.from_numpy(x[:256]))).numpy()
    checks = {"onnx_max_abs_diff": check_diff(logits[:256], reference),
              "public_raw_acc": ort_accuracy(public, x, y),  # the backbone's features read as class scores
              "authorized_acc": float((logits.argmax(1) == y).mean()),
              "backbone_sha256": digest, "num_features": int(feats.shape[1]),
              **{k: ckpt.metrics[k] for k in ("baseline_acc", "backbone_flops", "head_flops", "flops_ratio")
                 if k in ckpt.metrics}}
    log(f"public.onnx: the published backbone, weights verified (sha256 {digest[:16]}...); head sealed "
        f"({len(head_bytes):,} bytes of ONNX); max |onnx - torch| = {checks['onnx_max_abs_diff']:.2e}; "
        f"authorized {checks['authorized_acc']:.1%}; output policy {policy}")
    return _sealed_head(ckpt, policy, head_bytes, [int(feats.shape[1])], checks, {"sha256": digest})


def _split_user(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, log: Callable[[str], None]) -> Split:
    """A user's model: public.onnx is the public part exactly as protect exported it (its weights digest checked
    again); the head is the ONNX graph of everything after the cut, sealed, run by ONNX Runtime in the module."""
    import numpy as np

    from sealnet.onnx_session import ort_session
    from sealnet.outputs import DEFAULT_POLICY, parse_policy
    from sealnet.protect.checkpoint import tensor_bytes
    from sealnet.protect.methods.base import ExportError
    from sealnet.protect.onnx_export import FEATURES_NAME, INPUT_NAME
    from sealnet.protect.user_model import onnx_weights_digest

    policy = parse_policy(ckpt.secret.get("output_policy", DEFAULT_POLICY), ckpt.num_classes)
    public_bytes, head_bytes = tensor_bytes(ckpt.public_onnx), tensor_bytes(ckpt.secret["head_onnx"])
    digest = ckpt.secret["backbone_sha256"]
    if onnx_weights_digest(public_bytes) != digest:
        raise ExportError("the checkpoint's public part differs from the one protect recorded (weights sha256 "
                          f"{digest[:16]}...); re-run `sealnet protect`")
    onnx_path.write_bytes(public_bytes)
    public, sealed = ort_session(onnx_path), ort_session(head_bytes)
    x, y = data.x_test, data.y_test
    feats = np.concatenate([public.run(None, {INPUT_NAME: x[i : i + 250]})[0] for i in range(0, len(x), 250)])
    features_shape = [int(d) for d in ckpt.secret["features_shape"]]
    if list(feats.shape[1:]) != features_shape:
        raise ExportError(f"public.onnx yields features {list(feats.shape[1:])}, the head takes {features_shape}")
    logits = np.concatenate([sealed.run(None, {FEATURES_NAME: feats[i : i + 250]})[0]
                             for i in range(0, len(feats), 250)])
    authorized = float((logits.argmax(1) == y).mean())
    if abs(authorized - ckpt.metrics["authorized_acc"]) > 0.02:
        raise ExportError(f"public.onnx + head reach {authorized:.1%} in ONNX Runtime but "
                          f"{ckpt.metrics['authorized_acc']:.1%} "
                          "in training: the ONNX graphs do not compute the trained model")
    leaked = bool(ckpt.secret.get("public_trained_on_private_data"))
    checks = {"authorized_acc": authorized, "onnx_max_abs_diff": ckpt.metrics["onnx_max_abs_diff"],
              "backbone_sha256": digest,
              "num_features": int(np.prod(features_shape)), "features_shape": features_shape,
              "public_trained_on_private_data": leaked,
              **{k: ckpt.metrics[k] for k in ("baseline_acc", "backbone_flops", "head_flops", "flops_ratio",
                                              "head_share") if k in ckpt.metrics}}
    log(f"public.onnx: {ckpt.model_config.get('source')} up to {ckpt.model_config.get('split_at')!r} (weights sha256 "
        f"{digest[:16]}...); head sealed ({len(head_bytes):,} bytes of ONNX, {checks.get('head_share', 0):.1%} of "
        f"the MACs); authorized {authorized:.1%}; output policy {policy}"
        + ("; WARNING: the public part was fine-tuned on the private data" if leaked else ""))
    return _sealed_head(ckpt, policy, head_bytes, features_shape, checks,
                        {"source": Path(str(ckpt.model_config.get("source"))).name,
                         "split_at": ckpt.model_config.get("split_at"), "sha256": digest,
                         "public_trained_on_private_data": leaked})


def _sealed_head(ckpt: ProtectedCheckpoint, policy, head_bytes: bytes, features_shape: list[int],
                 checks: dict, backbone: dict) -> Split:
    """What both splits seal and sign: the head's ONNX graph and its settings for the module, the manifest's
    output policy and backbone (`backbone`: its method-specific fields)."""
    import numpy as np

    from sealnet.outputs import policy_outputs

    num_features = int(np.prod(features_shape))
    config = {"method": SealedHead.name, "policy": str(policy), "num_classes": ckpt.num_classes,
              "num_features": num_features, "features_shape": list(features_shape)}
    arrays = {"head_onnx": np.frombuffer(head_bytes, dtype=np.uint8).copy()}
    manifest = {"output_policy": str(policy),
                "backbone": {"arch": ckpt.model_name, **backbone, "num_features": num_features,
                             "features_shape": list(features_shape)}}
    return Split(config, arrays, checks, manifest, outputs=policy_outputs(policy, ckpt.num_classes))
