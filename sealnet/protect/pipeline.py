"""`sealnet protect`: train a baseline and a protected model on the same data and seed, write a checkpoint."""

from __future__ import annotations

from pathlib import Path

from sealnet.data import Dataset
from sealnet.protect.checkpoint import ProtectedCheckpoint, save_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.train import TrainConfig, accuracy, seed_everything, train_new_model, train_transform
from sealnet.protect.transform import create_transform


def protect_transform(data: Dataset, variant: str, out: Path, cfg: TrainConfig, model_name: str = "simple_cnn",
                      baseline: bool = True, model_config: dict | None = None) -> ProtectedCheckpoint:
    """Train the anti-piracy transform + network; metrics: baseline / authorized / raw accuracy on the test split."""
    metrics: dict[str, float] = {}
    if baseline:
        plain, metrics["baseline_epoch_s"] = train_new_model(data, cfg, model_name, model_config)
        metrics["baseline_acc"] = accuracy(plain, data.x_test, data.y_test)
    seed_everything(cfg.seed)
    model = create_model(model_name, data.input_shape, data.num_classes, **(model_config or {}))
    transform = create_transform(variant, data.input_shape, seed=cfg.seed)
    metrics["protected_epoch_s"] = train_transform(model, transform, data, cfg)
    metrics["authorized_acc"] = accuracy(model, data.x_test, data.y_test, transform)
    metrics["raw_acc"] = accuracy(model, data.x_test, data.y_test)
    ckpt = ProtectedCheckpoint(
        method="transform", model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        secret={"variant": variant, "config": dict(transform.config),
                "state": {k: v.detach().clone() for k, v in transform.state_dict().items()}},
        dataset=data.name, data_config=dict(data.options), seed=cfg.seed, metrics=metrics, model_config=dict(model_config or {}),
    )
    save_checkpoint(ckpt, out)
    return ckpt
