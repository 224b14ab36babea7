"""`sealnet protect`: train a baseline and a protected model on the same data and seed, write a checkpoint."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sealnet.data import Dataset
from sealnet.protect.checkpoint import ProtectedCheckpoint, bytes_tensor, save_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.train import TrainConfig, accuracy, seed_everything, train_new_model, train_plain, train_transform
from sealnet.protect.transform import create_transform

if TYPE_CHECKING:
    from sealnet.protect.user_model import TorchUserModel


def protect_transform(data: Dataset, variant: str, out: Path, cfg: TrainConfig, model_name: str = "simple_cnn",
                      baseline: bool = True, model_config: dict | None = None, user: TorchUserModel | None = None
                      ) -> ProtectedCheckpoint:
    """Train the anti-piracy transform + network; metrics: baseline / authorized / raw accuracy on the test split.
    With `user` (a user's torch model) that network, from its own weights, is trained instead of `model_name`."""
    metrics: dict[str, float] = {}
    if baseline:
        if user is None:
            plain, metrics["baseline_epoch_s"] = train_new_model(data, cfg, model_name, model_config)
        else:
            plain = copy.deepcopy(user.module)
            metrics["baseline_epoch_s"] = train_plain(plain, data, cfg)
        metrics["baseline_acc"] = accuracy(plain, data.x_test, data.y_test)
    seed_everything(cfg.seed)
    if user is None:
        model = create_model(model_name, data.input_shape, data.num_classes, **(model_config or {}))
    else:
        model = copy.deepcopy(user.module)
    transform = create_transform(variant, data.input_shape, seed=cfg.seed)
    metrics["protected_epoch_s"] = train_transform(model, transform, data, cfg)
    metrics["authorized_acc"] = accuracy(model, data.x_test, data.y_test, transform)
    metrics["raw_acc"] = accuracy(model, data.x_test, data.y_test)
    public_onnx = None
    if user is not None:  # the user's network ships as ONNX: no registry entry rebuilds it
        public_onnx = bytes_tensor(user_public_onnx(model, data, metrics))
        model_name, model_config = user.name, {"source": user.spec}
    ckpt = ProtectedCheckpoint(
        method="transform", model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state={} if user else {k: v.detach().clone() for k, v in model.state_dict().items()},
        public_onnx=public_onnx,
        secret={"variant": variant, "config": dict(transform.config),
                "state": {k: v.detach().clone() for k, v in transform.state_dict().items()}},
        dataset=data.name,
        data_config=dict(data.options), seed=cfg.seed, metrics=metrics, model_config=dict(model_config or {}),
    )
    save_checkpoint(ckpt, out)
    return ckpt


def user_public_onnx(model: nn.Module, data: Dataset, metrics: dict[str, float]) -> bytes:
    """A user's trained network as ONNX bytes (input `input`, output `logits`), checked against torch on the
    test split; the difference goes into `metrics` (the export reports it)."""
    from sealnet.onnx_session import ort_session
    from sealnet.protect.onnx_export import INPUT_NAME, check_diff, export_onnx

    buffer = io.BytesIO()
    export_onnx(model, (torch.zeros(1, *data.input_shape),), buffer, [INPUT_NAME])
    x = data.x_test[:256]
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(x)).numpy()
    got = ort_session(buffer.getvalue()).run(None, {INPUT_NAME: x})[0]
    metrics["onnx_max_abs_diff"] = check_diff(np.asarray(got), reference)
    return buffer.getvalue()
