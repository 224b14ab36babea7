"""Training with passports: ownership schemes V1, V2, V3 of the extended passport paper (Fan, Ng & Chan).

- V1: the passport is needed at inference. Loss = CE(passport branch) + sign loss + decorrelation term.
- V2: a private passport is embedded but not distributed. Multi-task training alternates, per batch, a step
  on the public branch (learned public gamma/beta, no passport) and a step on the passport branch (CE + sign
  loss + decorrelation), sharing all convolution weights (Algorithm 6). GroupNorm instead of BatchNorm.
- V3: V2 plus a trigger set (Adi et al.) of out-of-distribution images with random labels, mixed into every
  batch of both branches, for black-box verification through the deployed (public) network.

Two terms that are not in the papers (set their weights to 0 for the papers' loss):
- decorrelation (`decor_weight`, on by default; sealnet.protect.passport.decorrelation_loss): with the papers' loss the
  map P -> gamma grows a rank-one component along the true gamma, and the top singular vector of the *public*
  weights then gives gamma away: measured on embedded MNIST, reverse engineering started from it recovers
  94% accuracy and all signature bits from 40 training images. The term keeps the true direction at no more
  than `decor_share` times an average direction's energy; it costs accuracy, so the default recipe trains
  12 epochs (valid within 1 pt of the plain net trained the same way).
- anti-fake (`fake_weight`, off by default): the mean true-class probability when every sample of the batch
  runs with its own random passport. It did not lower the fake-passport maximum further once the last
  passport layer is wide and the decorrelation term is on, and it cost accuracy.
The plain baseline is trained with the same optimizer, schedule and epochs (`train_baseline`). For chain-shaped
nets (cnn_p, alexnet_p) the passport net then starts from the baseline's function (`warm_start`, ours): from
scratch it ended 0.8-1.8 pts under the baseline on embedded MNIST (3 seeds; the decorrelation term costs
accuracy). Copying the baseline as it is made the natural guess gamma=1, beta=0 work (60%), so the copy is
reparametrised first: every channel gets a designated sign (signature + seeded padding bits) and its filter is
negated where that sign is -1, and every channel is rescaled by a random factor in [e^-1.5, e^1.5] that the next
layer's weights undo. The network computes the baseline's function exactly when gamma = sign * factor * the
baseline's BN weight (and beta likewise scaled), so no constant guess is close to it.

Passports and signature bits are written to a separate passport file (the owner's verification secret) and,
for scheme V1, into the protected checkpoint's secret part (the trusted module needs them at inference).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sealnet.protect.passport_models  # noqa: F401  (registers cnn_p, alexnet_p, resnet18_p and plain counterparts)
from sealnet.data import Dataset
from sealnet.protect import DEFAULT_SIGNATURE
from sealnet.protect.checkpoint import ProtectedCheckpoint, load_tagged, save_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.passport import (
    GAMMA0,
    PASSPORT_BRANCH,
    PASSPORT_FNS,
    PASSPORT_TYPES,
    SCHEMES,
    PassportLayer,
    decorrelation_loss,
    extract_bits,
    frozen_norm_stats,
    get_passports,
    make_passports,
    passport_branch,
    passport_layers,
    random_params,
    set_passports,
    sign_loss,
    signature_bits,
    signature_capacity,
    signature_gammas,
    signature_to_bits,
    use_params,
)
from sealnet.protect.passport_models import PLAIN_COUNTERPART, ConvNorm, plain_config
from sealnet.protect.train import TrainConfig, _batches, _epochs, accuracy, seed_everything, train_plain

PASSPORT_FORMAT = "sealnet-passport/1"


@dataclass(frozen=True)
class PassportConfig:
    scheme: str = "v1"  # ownership scheme: v1 | v2 | v3
    passport_type: str = "random"  # T1 random | T2 fixed (image) | T3 shuffled (images)
    passport_fn: str = "both"  # which of gamma/beta come from passports: gamma | beta | both
    signature: str = DEFAULT_SIGNATURE
    gamma0: float = GAMMA0  # sign-loss margin
    sign_weight: float = 1.0
    fake_weight: float = 0.0  # anti-fake term (ours; measured: no gain on top of the decorrelation term)
    decor_weight: float = 1.0  # decorrelation term (ours; 0: the papers' loss, see decorrelation_loss)
    decor_share: float = 4.0  # allowed energy of the true direction, in units of an average direction's
    decor_on: str = "gamma"  # gamma | both: which passport-derived parameters the term protects
    num_images: int = 20  # T3: images whose feature maps are shuffled into passports
    trigger_size: int = 50  # V3: trigger images
    trigger_per_batch: int = 16  # V3: trigger images mixed into each batch
    eps_f: float = 0.03  # fidelity threshold for verification (the paper: 3% for AlexNet_p)
    lr_schedule: str = "cosine"  # cosine | constant (the baseline is trained with the same schedule)
    pad_signature: bool = False  # also fix the signs of the channels the signature does not use
    passport_scale: float = 1.0  # T1 passports are U[-scale, scale]; fakes are drawn the same way
    optimizer: str = "adam"  # adam | sgd (momentum 0.9, as the papers); the baseline uses the same
    warm_start: bool = True  # chain nets: start from the trained baseline, reparametrised (needs the baseline)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.passport_type not in PASSPORT_TYPES:
            raise ValueError(f"unknown passport type {self.passport_type!r}; choose one of {', '.join(PASSPORT_TYPES)}")
        if self.passport_fn not in PASSPORT_FNS:
            raise ValueError(f"unknown passport function {self.passport_fn!r}; choose one of {', '.join(PASSPORT_FNS)}")


# -- trigger set --------------------------------------------------------------------------------------------
def make_trigger_set(input_shape: tuple[int, ...], n: int, num_classes: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Abstract out-of-distribution images (smoothed noise blobs in [0, 1]) with random labels."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    c, h, w = input_shape
    coarse = torch.rand(n, c, max(h // 4, 2), max(w // 4, 2), generator=gen)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = (x - x.amin(dim=(1, 2, 3), keepdim=True)) / (x.amax(dim=(1, 2, 3), keepdim=True)
                                                      - x.amin(dim=(1, 2, 3), keepdim=True) + 1e-6)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x.numpy().astype(np.float32), y.numpy().astype(np.int64)


# -- predictions --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_branch(model: nn.Module, x: np.ndarray, branch: str = "passport", batch_size: int = 500) -> np.ndarray:
    """Class predictions through the passport branch or (V2/V3) the public gamma/beta branch."""
    model.eval()
    out = []
    with passport_branch(model, branch == PASSPORT_BRANCH):
        for start in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[start : start + batch_size])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def branch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, branch: str = "passport") -> float:
    return float((predict_branch(model, x, branch) == y).mean())


# -- training -----------------------------------------------------------------------------------------------
def _stem_in_body(model: nn.Module) -> bool:
    """True when every passport layer sits in model.body, so the stem's output can be shared by two passes."""
    body = getattr(model, "body", None)
    stem = getattr(model, "stem", None)
    return body is not None and stem is not None and not passport_layers(stem)


def fake_terms(model: nn.Module, h: torch.Tensor, y: torch.Tensor, gen: torch.Generator, split: bool,
               with_penalty: bool, pcfg: PassportConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(anti-fake, decorrelation) terms from one fresh random passport per sample of the batch.

    Anti-fake: mean softmax probability of the true class when every sample runs with its own random passport
    (BatchNorm running stats untouched). Decorrelation: `decorrelation_loss` on the same random passports.
    """
    fake = random_params(model, gen, len(y), pcfg.passport_scale)
    keys = ("gamma", "beta") if pcfg.decor_on == "both" else ("gamma",)
    decor = decorrelation_loss(model, fake, pcfg.decor_share, keys)
    if not with_penalty:
        return torch.zeros(()), decor
    with use_params(model, fake), frozen_norm_stats(model):
        logits = model.body(h) if split else model(h)
    return F.softmax(logits, dim=1).gather(1, y[:, None]).mean(), decor


def make_optimizer(params, kind: str, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {kind!r}; choose adam or sgd")


def make_scheduler(opt: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown lr schedule {kind!r}; choose cosine or constant")


def train_baseline(model: nn.Module, data: Dataset, cfg: TrainConfig, lr_schedule: str = "cosine",
                   optimizer: str = "adam", label: str = "baseline") -> float:
    """The plain counterpart, trained with the passport net's recipe (optimizer, schedule, batches); s/epoch."""
    return train_plain(model, data, cfg, optimizer=make_optimizer(model.parameters(), optimizer, cfg.lr),
                       schedule=lambda opt, steps: make_scheduler(opt, lr_schedule, steps), label=label)


# Layers between a passport layer and the next weighted layer that keep per-channel positive scaling:
# f(a * x) = a * f(x) channel by channel.
_SCALE_TRANSPARENT = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _input_weight(layer: nn.Module) -> torch.Tensor:
    for attr in ("conv", "linear"):
        if isinstance(getattr(layer, attr, None), nn.Conv2d | nn.Linear):
            return getattr(layer, attr).weight
    return layer.weight


def passport_consumers(model: nn.Module) -> dict[str, nn.Module] | None:
    """{passport layer name: the next layer with weights} for a chain net (stem then body, flat Sequentials) whose
    passport layers reach that layer through scale-transparent layers only; None for any other shape (ResNet)."""
    chain = []
    for part in ("stem", "body"):
        seq = getattr(model, part, None)
        if not isinstance(seq, nn.Sequential):
            return None
        chain += [(f"{part}.{i}", m) for i, m in enumerate(seq)]
    out: dict[str, nn.Module] = {}
    pending = None
    for name, layer in chain:
        if isinstance(layer, _SCALE_TRANSPARENT):
            continue
        if not isinstance(layer, PassportLayer | ConvNorm | nn.Conv2d | nn.Linear):
            return None
        if pending is not None:
            out[pending] = layer
        pending = name if isinstance(layer, PassportLayer) else None
    return None if pending is not None or not out else out


@torch.no_grad()
def warm_start(model: nn.Module, plain: nn.Module, bits: np.ndarray, gen: torch.Generator) -> bool:
    """Start the passport net from the trained plain counterpart, reparametrised (see the module docstring):
    filters negated where the designated sign `bits` (one per passport channel, layer order) is -1, channels
    rescaled by random factors undone by the next layer. False (nothing changed) when the net is not a chain."""
    consumers = passport_consumers(model)
    if consumers is None:
        return False
    layers = passport_layers(model)
    if len(bits) != sum(layer.weight().shape[0] for layer in layers.values()):
        raise ValueError(f"warm start needs one designated sign per passport channel, got {len(bits)}")
    own, theirs = model.state_dict(), plain.state_dict()
    model.load_state_dict({k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}, strict=False)
    start = 0
    for name, layer in layers.items():
        weight = layer.weight()
        channels = weight.shape[0]
        sign = torch.from_numpy(bits[start : start + channels].astype(np.float32))
        start += channels
        weight.mul_(sign.reshape(-1, *[1] * (weight.dim() - 1)))
        stats = getattr(layer.norm, "running_mean", None)  # BatchNorm in eval mode: norm(-z) needs -mean
        if stats is not None:
            stats.mul_(sign)
        factor = torch.exp((torch.rand(channels, generator=gen) * 2 - 1) * 1.5)
        nxt = _input_weight(consumers[name])
        per_channel = nxt.shape[1] // channels  # a Linear after Flatten sees each channel H*W times
        nxt.view(nxt.shape[0], channels, per_channel, -1).div_(factor.reshape(1, -1, 1, 1))
    return True


def train_passport(model: nn.Module, data: Dataset, cfg: TrainConfig, pcfg: PassportConfig, bits: np.ndarray,
                   trigger: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Train a passport net under scheme pcfg.scheme; returns seconds per epoch."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fake_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # never the evaluation's fake seeds
    opt = make_optimizer(model.parameters(), pcfg.optimizer, cfg.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    b = torch.from_numpy(bits.astype(np.float32))
    split = _stem_in_body(model)
    tx = ty = None
    if trigger is not None:
        tx, ty = torch.from_numpy(trigger[0]), torch.from_numpy(trigger[1])
    t_pos = 0
    n_batches = -(-len(x) // cfg.batch_size)
    multitask = pcfg.scheme in ("v2", "v3")

    sched = make_scheduler(opt, pcfg.lr_schedule, cfg.epochs * n_batches * (2 if multitask else 1))

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    start = time.perf_counter()
    for _, bar in _epochs(cfg, f"passport/{pcfg.scheme}", n_batches):
        model.train()
        for idx in _batches(len(x), cfg.batch_size, gen):
            xb, yb = x[idx], y[idx]
            if tx is not None:
                t_idx = torch.arange(t_pos, t_pos + pcfg.trigger_per_batch) % len(tx)
                t_pos = (t_pos + pcfg.trigger_per_batch) % len(tx)
                xb, yb = torch.cat([xb, tx[t_idx]]), torch.cat([yb, ty[t_idx]])
            if multitask:  # Algorithm 6: a step without passports, then one with them
                with passport_branch(model, False):
                    public_ce = F.cross_entropy(model(xb), yb)
                step(public_ce)
            with passport_branch(model, True):
                h = model.stem(xb) if split else xb
                ce = F.cross_entropy(model.body(h) if split else model(h), yb)
                sl = sign_loss(signature_gammas(model), b, pcfg.gamma0)
                loss = ce + pcfg.sign_weight * sl
                fk = dc = torch.zeros(())
                if pcfg.fake_weight > 0 or pcfg.decor_weight > 0:
                    fk, dc = fake_terms(model, h, yb, fake_gen, split, pcfg.fake_weight > 0, pcfg)
                    loss = loss + pcfg.fake_weight * fk + pcfg.decor_weight * dc
            step(loss)
            bar.update(1)
            bar.set_postfix(ce=f"{ce.item():.3f}", sign=f"{sl.item():.3f}", fake=f"{fk.item():.3f}",
                            decor=f"{dc.item():.3f}", refresh=False)
    return (time.perf_counter() - start) / max(cfg.epochs, 1)


# -- passport files -------------------------------------------------------------------------------------------
def passport_secret(model: nn.Module, pcfg: PassportConfig, bits: np.ndarray,
                    trigger: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """The secret part of a passport model: passports, signature bits, scheme (torch.load weights_only-safe)."""
    return {
        "scheme": pcfg.scheme,
        "passport_fn": pcfg.passport_fn,
        "passport_type": pcfg.passport_type,
        "passports": get_passports(model),
        "bits": torch.from_numpy(bits.astype(np.int8)),
        "signature_nbits": len(signature_to_bits(pcfg.signature)),
        "gamma0": pcfg.gamma0,
        "passport_scale": pcfg.passport_scale,
        "eps_f": pcfg.eps_f,
        "trigger_x": None if trigger is None else torch.from_numpy(trigger[0]),
        "trigger_y": None if trigger is None else torch.from_numpy(trigger[1]),
    }


def save_passport_file(secret: dict[str, Any], path: Path, **extra: Any) -> Path:
    """Write the owner's passport file atomically with mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save({"format": PASSPORT_FORMAT, **secret, **extra}, f)
    os.replace(tmp, path)
    return path


def load_passport_file(path: Path) -> dict[str, Any]:
    return load_tagged(path, PASSPORT_FORMAT, "passport file")


def default_passport_path(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".passport.pt")


def passport_model(ckpt: ProtectedCheckpoint, secret: dict[str, Any] | None = None) -> nn.Module:
    """The public network of a passport checkpoint with passports installed (from `secret` or the checkpoint)."""
    ckpt.require_method("passport")
    model = ckpt.build_public_model()
    set_passports(model, (secret or ckpt.secret)["passports"])
    return model.eval()


# -- the pipeline ---------------------------------------------------------------------------------------------
def protect_passport(data: Dataset, out: Path, cfg: TrainConfig, pcfg: PassportConfig, model_name: str = "cnn_p",
                     model_config: dict[str, Any] | None = None, baseline: bool = True,
                     passport_out: Path | None = None) -> ProtectedCheckpoint:
    """Train the plain counterpart (baseline) and the passport net; write the checkpoint and the passport file.

    Metrics: baseline_acc (plain net), valid_acc (passport branch with the owner's passport), public_acc
    (V2/V3: the distributed network, no passport), signature_match, trigger_acc (V3, public branch).
    """
    if model_name not in PLAIN_COUNTERPART:
        raise ValueError(f"{model_name!r} is not a passport net; choose one of {', '.join(PLAIN_COUNTERPART)}")
    mcfg = {"scheme": pcfg.scheme, "passport_fn": pcfg.passport_fn, **(model_config or {})}
    metrics: dict[str, Any] = {}
    plain = None
    if baseline:
        seed_everything(cfg.seed)
        plain = create_model(PLAIN_COUNTERPART[model_name], data.input_shape, data.num_classes, **plain_config(mcfg))
        metrics["baseline_epoch_s"] = train_baseline(plain, data, cfg, pcfg.lr_schedule, pcfg.optimizer)
        metrics["baseline_acc"] = accuracy(plain, data.x_test, data.y_test)
    seed_everything(cfg.seed)
    model = create_model(model_name, data.input_shape, data.num_classes, **mcfg)
    capacity = signature_capacity(model)
    warm = pcfg.warm_start and plain is not None and passport_consumers(model) is not None
    # A warm start designates every channel's sign (the baseline's channels are aligned to them).
    bits = signature_bits(pcfg.signature, capacity, seed=cfg.seed, pad=pcfg.pad_signature or warm)
    gen = torch.Generator().manual_seed(cfg.seed + 4242)
    trigger = None
    if pcfg.scheme == "v3":
        trigger = make_trigger_set(data.input_shape, pcfg.trigger_size, data.num_classes, seed=cfg.seed)
    images = None
    if pcfg.passport_type != "random":
        # V3 draws passport images from its trigger set (Algorithm 6), the others from the training data.
        pool = trigger[0] if trigger is not None else data.x_train
        pick = torch.randperm(len(pool), generator=gen)[: max(pcfg.num_images, 2)]
        images = torch.from_numpy(pool[pick.numpy()])
    set_passports(model, make_passports(model, pcfg.passport_type, gen, images, feature_model=plain,
                                        scale=pcfg.passport_scale))
    metrics["warm_start"] = warm and warm_start(model, plain, bits, torch.Generator().manual_seed(cfg.seed + 4343))
    metrics["protected_epoch_s"] = train_passport(model, data, cfg, pcfg, bits, trigger)
    model.eval()
    metrics["valid_acc"] = branch_accuracy(model, data.x_test, data.y_test, "passport")
    if pcfg.scheme != "v1":
        metrics["public_acc"] = branch_accuracy(model, data.x_test, data.y_test, "public")
    got = extract_bits(model)
    metrics["signature_bits"] = len(signature_to_bits(pcfg.signature))
    metrics["signature_match"] = bool((got[: metrics["signature_bits"]] == bits[: metrics["signature_bits"]]).all())
    metrics["bits_matched"] = int((got[: len(bits)] == bits).sum())
    metrics["designated_bits"] = len(bits)
    metrics["capacity_bits"] = capacity
    if trigger is not None:
        metrics["trigger_acc"] = branch_accuracy(model, trigger[0], trigger[1], "public")
        metrics["trigger_acc_passport"] = branch_accuracy(model, trigger[0], trigger[1], "passport")
    secret = passport_secret(model, pcfg, bits, trigger)
    ckpt = ProtectedCheckpoint(
        method="passport", model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        secret=secret, dataset=data.name,
        data_config=dict(data.options), seed=cfg.seed, metrics=metrics, model_config=mcfg,
    )
    save_checkpoint(ckpt, out)
    save_passport_file(secret, passport_out or default_passport_path(out), model_name=model_name,
                       valid_acc=metrics["valid_acc"], config=asdict(pcfg) | {"signature": None},
                       train={"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr})
    return ckpt
