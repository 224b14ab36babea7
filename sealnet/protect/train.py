"""Training loops: a plain baseline and the anti-piracy transform trained jointly with the network."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sealnet.data import Dataset
from sealnet.protect.models import create_model


def seed_everything(seed: int) -> None:
    """Fix every RNG training touches, so a run with the same seed trains the same model."""
    torch.manual_seed(seed)
    np.random.seed(seed)


MIN_MARGIN_OVER_CHANCE = 0.1  # a protected model must be useful to its licensees: accuracy >= chance + 10 pts


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    alpha: float = 1.0  # weight of CE on processed inputs
    beta: float = 1.0  # weight of the true-class probability on raw inputs
    gamma: float = 0.01  # weight of ||x_p - x_r||^2
    progress: bool = True


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, transform: nn.Module | None = None, batch_size: int = 500) -> np.ndarray:
    """Class predictions for float32 NCHW inputs, optionally through an input transform."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        if transform is not None:
            transform.eval()
            xb = transform(xb)
        out.append(model(xb).argmax(1).numpy())
    return np.concatenate(out)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, transform: nn.Module | None = None) -> float:
    return float((predict(model, x, transform) == y).mean())


def _epochs(cfg: TrainConfig, label: str, n_batches: int):
    for epoch in range(cfg.epochs):
        # On a terminal the bar redraws live; in a log file it writes one line per epoch.
        bar = tqdm(total=n_batches, desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=True, unit="batch", mininterval=0.5 if sys.stderr.isatty() else float("inf"))
        yield epoch, bar
        bar.close()


def train_plain(model: nn.Module, data: Dataset, cfg: TrainConfig, *, optimizer: torch.optim.Optimizer | None = None,
                schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None, label: str = "baseline") -> float:
    """Ordinary cross-entropy training (Adam at cfg.lr unless `optimizer` is given; `schedule(opt, total_steps)`
    makes an LR scheduler stepped per batch); returns seconds per epoch."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n_batches = -(-len(x) // cfg.batch_size)
    sched = schedule(opt, cfg.epochs * n_batches) if schedule else None
    start = time.perf_counter()
    for _, bar in _epochs(cfg, label, n_batches):
        model.train()
        for idx in _batches(len(x), cfg.batch_size, gen):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return (time.perf_counter() - start) / max(cfg.epochs, 1)


def train_new_model(data: Dataset, cfg: TrainConfig, model_name: str, model_config: dict[str, Any] | None = None, *,
                    label: str = "baseline") -> tuple[nn.Module, float]:
    """A registered model initialised from seed cfg.seed and trained by `train_plain`: (model, seconds per epoch).
    The unprotected baseline each method reports, and the DSN teacher."""
    seed_everything(cfg.seed)
    model = create_model(model_name, data.input_shape, data.num_classes, **(model_config or {}))
    return model, train_plain(model, data, cfg, label=label)


def transform_loss(model: nn.Module, transform: nn.Module, xr: torch.Tensor, y: torch.Tensor,
                   cfg: TrainConfig) -> torch.Tensor:
    """E = alpha*CE(F(x_p), y) + beta*sum_i p_i q_r,i + gamma*||x_p - x_r||^2 (Chen & Wu, Eq. 1-3).

    The raw-input term is the softmax probability of the true class, so minimising it drives raw-input
    accuracy down; the distortion term is the squared L2 norm per image, averaged over the batch.
    """
    xp = transform(xr)
    ce = F.cross_entropy(model(xp), y)
    q_raw = F.softmax(model(xr), dim=1).gather(1, y[:, None]).mean()
    distortion = (xp - xr).pow(2).flatten(1).sum(1).mean()
    return cfg.alpha * ce + cfg.beta * q_raw + cfg.gamma * distortion


def train_transform(model: nn.Module, transform: nn.Module, data: Dataset, cfg: TrainConfig) -> float:
    """Joint training of the public network and the (trainable part of the) transform; returns s/epoch."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(model.parameters()) + [p for p in transform.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n_batches = -(-len(x) // cfg.batch_size)
    start = time.perf_counter()
    for _, bar in _epochs(cfg, f"transform/{transform.variant}", n_batches):
        model.train()
        transform.train()
        for idx in _batches(len(x), cfg.batch_size, gen):
            loss = transform_loss(model, transform, x[idx], y[idx], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return (time.perf_counter() - start) / max(cfg.epochs, 1)
