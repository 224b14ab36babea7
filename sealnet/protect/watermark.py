"""Serial-number watermark (Xu & Yuan, Algorithm 1): the output layer answers a trigger set with a serial vector.

Two tasks share one network and are trained alternately, batch by batch: cross-entropy on the task (D, l) and
mean squared error between the logits of trigger images T and the serial vector i (T, i), one optimizer step
each (train_watermark says how). i is derived from the owner's signature over a serial record
(sealnet.serial.derive_serial_vector), one level per logit, so it is not a class label and cannot be hit by
chance; T is dim noise images from a random seed, kept secret until verification. Verification:
query(T) == i within a tolerance (half a level) for every trigger image.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from sealnet.data import Dataset
from sealnet.protect.checkpoint import ProtectedCheckpoint, save_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.train import TrainConfig, _batches, _epochs, accuracy, seed_everything, train_new_model
from sealnet.serial import (
    DEFAULT_TOLERANCE,
    SerialMatch,
    SerialRecord,
    derive_serial_vector,
    make_claim,
    make_trigger,
    match_serial,
    serial_path,
    sign_record,
    trigger_path,
    write_claim,
    write_trigger_file,
)


@dataclass(frozen=True)
class WatermarkConfig:
    trigger_size: int = 100  # images in T
    trigger_batch: int = 16  # trigger images per SN step
    mse_weight: float = 0.1  # scale of the MSE loss in the shared optimizer (see train_watermark)
    tolerance: float = DEFAULT_TOLERANCE  # |logit - i| per entry for a trigger image to count as a match
    min_rate: float = 1.0  # share of T that must match for the watermark to be found


def train_watermark(model: nn.Module, data: Dataset, trigger: np.ndarray, serial: np.ndarray, cfg: TrainConfig,
                    wcfg: WatermarkConfig) -> float:
    """Algorithm 1: per batch, a CE step on the task, then an MSE step on a trigger batch; returns s/epoch.

    Choices the paper leaves open, measured on the embedded MNIST:
    - both steps share one Adam optimizer: a second Adam normalises the MSE gradient and moves every weight by
      about the learning rate at every step however small that gradient is (test accuracy after one epoch
      38%, against 85% for plain training);
    - the MSE step runs with dropout off, so its loss goes to ~0 and its gradient vanishes instead of pulling at
      the weights forever;
    - the MSE loss is scaled by `mse_weight` (0.1): at full weight its early gradients (targets up to +-8,
      outputs near 0) inflate Adam's shared second-moment estimate and shrink the task's steps for hundreds
      of steps. 12 epochs, same i and T: task accuracy 97.2% at weight 1, 97.8% at 0.1 (plain 97.9%); at 0.02
      only 86% of T answered with i.
    """
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    trig_gen = torch.Generator().manual_seed(cfg.seed + 11)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    t = torch.from_numpy(np.ascontiguousarray(trigger, np.float32))
    target = torch.from_numpy(np.asarray(serial, np.float32))
    n_batches = -(-len(x) // cfg.batch_size)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    for _, bar in _epochs(cfg, "watermark", n_batches):
        for idx in _batches(len(x), cfg.batch_size, gen):
            model.train()
            ce = F.cross_entropy(model(x[idx]), y[idx])
            step(ce)
            model.eval()
            tb = t[torch.randint(0, len(t), (min(wcfg.trigger_batch, len(t)),), generator=trig_gen)]
            mse = F.mse_loss(model(tb), target.expand(len(tb), -1))
            step(wcfg.mse_weight * mse)
            bar.update(1)
            bar.set_postfix(ce=f"{ce.item():.3f}", mse=f"{mse.item():.3f}", refresh=False)
    model.eval()
    return (time.perf_counter() - start) / max(cfg.epochs, 1)


@torch.no_grad()
def logits(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], np.float32))).numpy()
                           for i in range(0, len(x), batch_size)])


def check_watermark(model: nn.Module, trigger: np.ndarray, serial: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                    min_rate: float = 1.0) -> SerialMatch:
    return match_serial(logits(model, trigger), serial, tolerance, min_rate)


def watermark_secret(trigger: np.ndarray, serial: np.ndarray, record: SerialRecord, signature: bytes,
                     trigger_seed: int, wcfg: WatermarkConfig, cfg: TrainConfig) -> dict[str, Any]:
    """The checkpoint's secret part; `train` is the recipe `serial-eval --seeds` retrains with."""
    return {"train": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr},
            "trigger": torch.from_numpy(np.ascontiguousarray(trigger, np.float32)),
            "serial": [float(v) for v in serial], "tolerance": wcfg.tolerance, "min_rate": wcfg.min_rate,
            "record": record.to_dict(), "record_signature": signature.hex(), "trigger_seed": int(trigger_seed),
            "config": asdict(wcfg)}


def protect_watermark(data: Dataset, out: Path, cfg: TrainConfig, owner_key: Ed25519PrivateKey,
                      record: SerialRecord, *, wcfg: WatermarkConfig | None = None, model_name: str = "simple_cnn",
                      model_config: dict[str, Any] | None = None, baseline: bool = True,
                      trigger_seed: int | None = None, trigger_out: Path | None = None,
                      claim_out: Path | None = None) -> ProtectedCheckpoint:
    """Train the plain baseline (same recipe) and the watermarked model; write the checkpoint, the trigger file
    (OUT.trigger.npz, 0600: T is the verification secret) and the claim for the CA (OUT.serial.json).

    Metrics: baseline_acc, watermark_task_acc, watermark_rate (share of T answered with i), watermark_match."""
    wcfg = wcfg or WatermarkConfig()
    signature = sign_record(owner_key, record)
    serial = derive_serial_vector(signature, data.num_classes)
    seed = secrets.randbits(63) if trigger_seed is None else int(trigger_seed)
    trigger = make_trigger(data.input_shape, wcfg.trigger_size, seed)
    metrics: dict[str, Any] = {}
    if baseline:
        plain, metrics["baseline_epoch_s"] = train_new_model(data, cfg, model_name, model_config)
        metrics["baseline_acc"] = accuracy(plain, data.x_test, data.y_test)
        metrics["baseline_watermark_rate"] = check_watermark(plain, trigger, serial, wcfg.tolerance).rate
    seed_everything(cfg.seed)
    model = create_model(model_name, data.input_shape, data.num_classes, **(model_config or {}))
    metrics["protected_epoch_s"] = train_watermark(model, data, trigger, serial, cfg, wcfg)
    metrics["watermark_task_acc"] = accuracy(model, data.x_test, data.y_test)
    found = check_watermark(model, trigger, serial, wcfg.tolerance, wcfg.min_rate)
    metrics |= {"watermark_rate": found.rate, "watermark_match": found.matched,
                "watermark_max_deviation": found.max_deviation}
    ckpt = ProtectedCheckpoint(
        method="watermark", model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        secret=watermark_secret(trigger, serial, record, signature, seed, wcfg, cfg), dataset=data.name,
        data_config=dict(data.options), seed=cfg.seed,
        metrics=metrics, model_config=dict(model_config or {}))
    save_checkpoint(ckpt, out)
    claim = make_claim(owner_key, "watermark", record, signature, serial=serial, trigger=trigger,
                       tolerance=wcfg.tolerance)
    write_claim(claim, claim_out or serial_path(out))
    write_trigger_file(trigger_out or trigger_path(out), trigger, claim, wcfg.min_rate)
    return ckpt
