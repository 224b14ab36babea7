"""Sealed head: the owner's private network over the taps of a frozen public backbone (TEESlice-style).

All private knowledge lives in the head, which only the trusted module runs; the backbone is published exactly
as given (never trained on the owner's data), so a copy of it is worth what black-box access is. The head is
trained with the backbone frozen (taps computed once), by distillation from a fully trained teacher plus CE.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sealnet.data import Dataset
from sealnet.errors import FailedPrecondition
from sealnet.protect.backbones import backbone_digest, build_backbone, extract_features, load_backbone_weights
from sealnet.protect.checkpoint import ProtectedCheckpoint
from sealnet.protect.heads import SealedHead, flops
from sealnet.protect.train import TrainConfig, accuracy, seed_everything, train_new_model

METHOD = "sealed-head"


class SealedHeadTrainingError(FailedPrecondition, RuntimeError):
    """Every attempt left the head too far below the baseline; the message names the seeds and accuracies."""


@dataclass(frozen=True)
class SealedHeadConfig:
    hidden: tuple[int, ...] = (256,)  # MLP hidden widths
    dropout: float = 0.3
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0  # distillation temperature (KL scaled by T^2, as Hinton et al.)
    # share of the distillation term (1 - kd_weight: CE on the labels). 0 by default: measured over three seeds,
    # distilling from the ~97-98% teacher held the head below what CE alone reaches (docs/sealed_head.md)
    kd_weight: float = 0.0
    seed: int = 0
    teacher_epochs: int = 8  # the unprotected baseline (teacher) when none is given
    teacher_model: str = "simple_cnn"
    max_drop: float = 0.015  # authorized accuracy must be >= baseline - max_drop
    attempts: int = 3  # seeds tried (seed, seed + 1, ...) before giving up
    max_flops_ratio: float = 0.15  # head MACs / backbone MACs


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def train_head(feats: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, num_classes: int,
               cfg: SealedHeadConfig) -> SealedHead:
    """Train a head on precomputed taps: kd_weight * T^2 KL(teacher_T || head_T) + (1 - kd_weight) * CE."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = SealedHead(feats.shape[1], num_classes, tuple(cfg.hidden), cfg.dropout)
    head.mean.copy_(feats.mean(0))
    head.std.copy_(feats.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(feats) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1))
    kd = cfg.kd_weight if teacher_logits is not None else 0.0
    t = cfg.temperature
    for _ in range(cfg.epochs):
        head.train()
        for idx in torch.randperm(len(feats), generator=gen).split(cfg.batch_size):
            out = head(feats[idx])
            loss = (1 - kd) * F.cross_entropy(out, labels[idx])
            if kd:
                soft = F.log_softmax(teacher_logits[idx] / t, 1)
                loss = loss + kd * t * t * F.kl_div(F.log_softmax(out / t, 1), soft, log_target=True,
                                                    reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def head_accuracy(head: nn.Module, feats: torch.Tensor, labels: np.ndarray) -> float:
    head.eval()
    return float((head(feats).argmax(1).numpy() == labels).mean())


def protect_sealed_head(data: Dataset, backbone_weights: Path, arch: str, cfg: SealedHeadConfig,
                        teacher: nn.Module | None = None, progress: bool = True,
                        model_config: dict[str, Any] | None = None,
                        log: Callable[[str], None] | None = None) -> ProtectedCheckpoint:
    """Frozen public backbone (weights file) + a head trained on its taps; a `sealed-head` checkpoint.

    The teacher (the unprotected baseline) is `teacher` or `cfg.teacher_model` trained on `data`. A head
    whose test accuracy is below baseline - cfg.max_drop is trained again with the next seed, up to
    cfg.attempts times; then SealedHeadTrainingError. The checkpoint is returned, not written."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    state = load_backbone_weights(backbone_weights, arch, data.input_shape, model_config)
    digest = backbone_digest(state)
    backbone = build_backbone(arch, data.input_shape, state, model_config)
    if teacher is None:
        tcfg = TrainConfig(epochs=cfg.teacher_epochs, seed=cfg.seed, progress=progress)
        teacher, _ = train_new_model(data, tcfg, cfg.teacher_model, label="baseline (teacher)")
    teacher.eval()
    baseline_acc = accuracy(teacher, data.x_test, data.y_test)
    teacher_logits = _logits(teacher, data.x_train) if cfg.kd_weight > 0 else None
    f_train, f_test = extract_features(backbone, data.x_train), extract_features(backbone, data.x_test)
    y_train = torch.from_numpy(data.y_train)
    backbone_flops = flops(backbone, data.input_shape)
    floor = baseline_acc - cfg.max_drop
    tried = []
    for attempt in range(max(1, cfg.attempts)):
        run = replace(cfg, seed=cfg.seed + attempt)
        head = train_head(f_train, y_train, teacher_logits, data.num_classes, run)
        acc = head_accuracy(head, f_test, data.y_test)
        tried.append(f"seed {run.seed}: {acc:.2%}")
        if acc >= floor:
            break
        log(f"sealed head with seed {run.seed}: {acc:.2%} < baseline {baseline_acc:.2%} - {cfg.max_drop:.1%}"
            + ("; training again with the next seed" if attempt + 1 < cfg.attempts else ""))
    else:
        raise SealedHeadTrainingError(
            f"sealed head stayed below baseline {baseline_acc:.2%} - {cfg.max_drop:.1%} in all {len(tried)} attempts "
            f"({'; '.join(tried)}); try a wider --head-hidden, more --epochs or another backbone")
    head_flops = flops(head, (f_train.shape[1],))
    ratio = head_flops / max(backbone_flops, 1)
    if ratio > cfg.max_flops_ratio:
        raise SealedHeadTrainingError(f"head costs {head_flops:,} MACs = {ratio:.1%} of the backbone's "
                                      f"{backbone_flops:,} (> {cfg.max_flops_ratio:.0%}); use a narrower --head-hidden")
    head_config = {"kind": "mlp", "in_features": int(f_train.shape[1]), "num_classes": int(data.num_classes),
                   "hidden": [int(h) for h in run.hidden], "dropout": float(run.dropout)}
    metrics = {"baseline_acc": baseline_acc, "authorized_acc": acc, "backbone_flops": backbone_flops,
               "head_flops": head_flops, "flops_ratio": ratio, "head_attempts": attempt + 1,
               "feature_dim": int(f_train.shape[1])}
    return ProtectedCheckpoint(
        method=METHOD, model_name=arch, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state=state,
        secret={"head_config": head_config,
                "head_state": {k: v.detach().clone() for k, v in head.state_dict().items()},
                "backbone_sha256": digest, "output_policy": "label",
                "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(run).items()}},
        dataset=data.name, seed=run.seed, metrics=metrics, model_config=dict(model_config or {}))


def protect_demo_sealed_head(data: Dataset, workdir: Path, *, epochs: int = 8, seed: int = 0,
                             log: Callable[[str], None] | None = None) -> ProtectedCheckpoint:
    """The embedded-data recipe of `sealnet demo --method sealed-head` and the attack suite's demo target:
    a tap_cnn backbone trained only on public data (scikit-learn's 8x8 digits) written to workdir/backbone.pt,
    then the sealed head on its frozen taps; the checkpoint is written to workdir/protected.pt."""
    from sealnet.protect.backbones import make_public_backbone
    from sealnet.protect.checkpoint import save_checkpoint

    weights = make_public_backbone("tap_cnn", seed, Path(workdir) / "backbone.pt", kind="digits")
    ckpt = protect_sealed_head(data, weights, "tap_cnn", SealedHeadConfig(seed=seed, teacher_epochs=epochs), log=log)
    save_checkpoint(ckpt, Path(workdir) / "protected.pt")
    return ckpt
