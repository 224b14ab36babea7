"""DSN, Deep Serial Number: one teacher, many customer students that work only on inputs stamped with their SN.

Training (DSN paper, Eq. 3-6): the student splits into a feature extractor Ge (all layers up to the penultimate
one) and the predictor Gy (the output layer); a second head Gd sits on Ge behind a gradient-reversal layer (GRL).
- I = 1, inputs stamped with the customer's pattern k: distillation, KL(P_T || softmax(Gy(Ge(x*)))) at a
  temperature, with P_T the teacher's soft labels on the same image (Eq. 3-4).
- I = 0: CE(Gd(GRL(Ge(x))), y) (Eq. 5); the GRL flips the gradient into Ge, so Gd learns to classify while Ge
  learns to make raw-input features carry no label information (Eq. 6). The GRL weight ramps up as in DANN
  (lambda_p = lambda * (2 / (1 + exp(-10 p)) - 1), p the training progress); the paper gives no schedule.
Ours, not in the paper (`wrong_fraction=0, uniform_weight=0` is the paper's loss):
- part of the I = 0 half is stamped with *wrong* patterns (uniformly random ones and near misses one or two
  bits away from k). With raw inputs alone a student learns "something in the corner" rather than "this
  pattern", and other customers' serial numbers unlock it;
- r(x) of Eq. 2 made explicit: cross-entropy between Gy's output on the I = 0 inputs and the uniform
  distribution, ramped like the GRL. Measured on the embedded MNIST (25 epochs): the GRL alone left near misses
  working (20 other customers' SNs: max 91%), with this term the max was 10%;
- Adam with cosine learning-rate decay (the paper divides by 10 on plateaus);
- the student starts from the teacher's weights (`teacher_init`). From random weights the stamp has to open
  the hidden layer before the GRL closes it on raw inputs, and which wins depended on the owner key: with
  three fresh keys one student collapsed to chance with its SN and one let other customers' SNs through.

Gd and the GRL exist only during training: the checkpoint holds the plain student (Ge + Gy), a registered
model, and the stamp parameters in its secret part (sealnet.serial.StampSpec.from_secret reads them).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from sealnet.data import Dataset
from sealnet.errors import FailedPrecondition
from sealnet.protect.checkpoint import ProtectedCheckpoint, load_checkpoint, save_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.train import (
    MIN_MARGIN_OVER_CHANCE,
    TrainConfig,
    _batches,
    _epochs,
    accuracy,
    seed_everything,
    train_new_model,
)
from sealnet.serial import SerialRecord, commitment, derive_pattern, make_claim, serial_path, sign_record, write_claim
from sealnet.stamp import StampSpec, stamp_scale

TEACHER_METHOD = "dsn-teacher"


class DSNTrainingError(FailedPrecondition, RuntimeError):
    """Every attempt at training the student collapsed; the message names the seeds and what to change."""


class PatternCollisionError(DSNTrainingError):
    """The customer's SN pattern equals another checked customer's: refused before any training (a property of
    the owner key and the record, not of training; another key or timestamp gives a new pattern)."""


@dataclass(frozen=True)
class DSNConfig:
    temperature: float = 2.0  # distillation temperature (KL scaled by T^2, as Hinton et al.)
    grl_lambda: float = 1.0  # final weight of the reversed gradient
    wrong_fraction: float = 0.5  # share of the I = 0 half stamped with wrong patterns (ours; 0 = the paper)
    near_fraction: float = 0.8  # share of those one or two bits away from k
    gd_hidden: int = 256  # hidden units of the Gd head
    uniform_weight: float = 0.3  # ours: cross-entropy to the uniform distribution of Gy's output on I = 0 inputs
    teacher_init: bool = True  # ours: the student starts from the teacher's weights (False: random, as before)


# -- the GRL and the two-branch student --------------------------------------------------------------------------
class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -lam backward (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, lam)


def split_student(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(Ge, Gy): Ge is everything up to the penultimate layer (`features` + `classifier[:-1]`), Gy the output
    layer. e must be computed by layers that see the whole image: convolution features away from the stamp do
    not depend on it, so only a fully connected layer can make raw-input features label-free."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not isinstance(features, nn.Module) or not isinstance(classifier, nn.Sequential) or not isinstance(
            classifier[-1], nn.Linear):
        raise ValueError(f"DSN needs a model with .features and a .classifier Sequential ending in a Linear layer; "
                         f"{type(model).__name__} has not")
    return nn.Sequential(features, *classifier[:-1]), classifier[-1]


def make_gd(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, hidden: int) -> nn.Module:
    """Gd: a two-layer head on e = Ge(x) (removed before export)."""
    ge, _ = split_student(model)
    with torch.no_grad():
        flat = ge(torch.zeros(1, *input_shape)).flatten(1).shape[1]
    return nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


# -- stamping in torch (bit-identical to sealnet.serial.stamp) ---------------------------------------------------
def stamp_torch(x: torch.Tensor, pattern: torch.Tensor | np.ndarray, position: tuple[int, int], scale: int
                ) -> torch.Tensor:
    """x stamped with `pattern` (h, w) or one pattern per sample (N, h, w); a new tensor."""
    p = torch.as_tensor(np.asarray(pattern) if not isinstance(pattern, torch.Tensor) else pattern)
    block = p.to(x.dtype).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    r, c = position
    bh, bw = block.shape[-2:]
    if r < 0 or c < 0 or r + bh > x.shape[-2] or c + bw > x.shape[-1]:
        raise ValueError(f"stamp of {bh}x{bw} pixels at ({r}, {c}) does not fit a {x.shape[-2]}x{x.shape[-1]} input")
    out = x.clone()
    out[..., r : r + bh, c : c + bw] = block[:, None] if block.dim() == 3 else block
    return out


def wrong_patterns(pattern: torch.Tensor, n: int, near_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """n patterns that differ from `pattern`: near misses (a share `near_fraction`; one bit flipped, or two for a
    third of them) and uniformly random ones."""
    h, w = pattern.shape
    bits = h * w
    flat = pattern.reshape(1, bits).to(torch.uint8)
    rand = torch.randint(0, 2, (n, bits), generator=gen, dtype=torch.uint8)
    near = torch.rand(n, generator=gen) < near_fraction
    flips = torch.zeros(n, bits, dtype=torch.uint8)
    first = torch.randint(0, bits, (n,), generator=gen)
    second = torch.randint(0, bits, (n,), generator=gen)
    two = torch.rand(n, generator=gen) < 1 / 3
    flips[torch.arange(n), first] = 1
    flips[torch.arange(n)[two], second[two]] ^= 1  # may undo `first`: handled below like any collision
    out = torch.where(near[:, None], flat ^ flips, rand)
    same = (out == flat).all(1)
    out[same] = flat ^ F.one_hot(first[same], bits).to(torch.uint8)
    return out.reshape(n, h, w)


# -- training ----------------------------------------------------------------------------------------------------
def grl_ramp(progress: float) -> float:
    """DANN's schedule 2 / (1 + exp(-10 p)) - 1: from 0 to ~1 over the first half of training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def train_student(student: nn.Module, teacher: nn.Module, spec: StampSpec, data: Dataset, cfg: TrainConfig,
                  dcfg: DSNConfig) -> float:
    """DSN distillation of `student` from `teacher` with serial number `spec` (Eq. 3-6); returns s/epoch.

    Each step takes a batch of cfg.batch_size images twice: stamped with k (distillation) and as I = 0 inputs
    (raw or stamped with wrong patterns; SN-embedding loss through the GRL), the paper's 500 + 500 layout.
    With dcfg.teacher_init the student starts as a copy of the teacher (same architecture required)."""
    if dcfg.teacher_init:
        try:
            student.load_state_dict(teacher.state_dict())
        except RuntimeError as exc:
            raise ValueError("the DSN student starts from the teacher's weights, so it needs the teacher's "
                             "architecture (same model and --hidden); the teacher checkpoint differs: "
                             f"{str(exc).splitlines()[-1].strip()}") from None
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    wrong_gen = torch.Generator().manual_seed(cfg.seed + 7)
    ge, gy = split_student(student)
    gd = make_gd(student, data.input_shape, data.num_classes, dcfg.gd_hidden)
    opt = torch.optim.Adam(list(student.parameters()) + list(gd.parameters()), lr=cfg.lr)
    teacher.eval()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    k = torch.from_numpy(spec.pattern)
    n_batches = -(-len(x) // cfg.batch_size)
    total, step = cfg.epochs * n_batches, 0
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    t_sq = dcfg.temperature**2
    start = time.perf_counter()
    for _, bar in _epochs(cfg, "dsn student", n_batches):
        student.train()
        gd.train()
        for idx in _batches(len(x), cfg.batch_size, gen):
            xb, yb = x[idx], y[idx]
            x_sn = stamp_torch(xb, k, spec.position, spec.scale)
            x_neg = xb
            n_wrong = int(round(dcfg.wrong_fraction * len(xb)))
            if n_wrong:
                wrong = wrong_patterns(k, n_wrong, dcfg.near_fraction, wrong_gen)
                x_neg = torch.cat([stamp_torch(xb[:n_wrong], wrong, spec.position, spec.scale), xb[n_wrong:]])
            with torch.no_grad():
                p_t = F.softmax(teacher(xb) / dcfg.temperature, dim=1)
            feats = ge(torch.cat([x_sn, x_neg]))
            e_sn, e_neg = feats[: len(xb)], feats[len(xb) :]
            distill = F.kl_div(F.log_softmax(gy(e_sn) / dcfg.temperature, dim=1), p_t, reduction="batchmean") * t_sq
            ramp = grl_ramp(step / max(total - 1, 1))
            sne = F.cross_entropy(gd(grad_reverse(e_neg, dcfg.grl_lambda * ramp)), yb)
            loss = distill + sne
            if dcfg.uniform_weight:
                loss = loss - dcfg.uniform_weight * ramp * F.log_softmax(gy(e_neg), dim=1).mean(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(distill=f"{distill.item():.3f}", sne=f"{sne.item():.3f}", refresh=False)
    student.eval()
    return (time.perf_counter() - start) / max(cfg.epochs, 1)


# -- evaluation helpers ------------------------------------------------------------------------------------------
def stamped_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: StampSpec | None) -> float:
    """Accuracy on inputs stamped with `spec` through sealnet.serial.stamp (what the trusted module runs), or raw."""
    return accuracy(model, x if spec is None else spec.apply(x), y)


def other_customer_specs(owner_key: Ed25519PrivateKey, record: SerialRecord, spec: StampSpec, n: int
                         ) -> list[StampSpec]:
    """The serial numbers of n other customers of the same owner and model (customer ids `other-01`...), at the
    same position: what a customer gets by stamping its own SN on another customer's student."""
    out = []
    for i in range(n):
        other = SerialRecord(record.company, record.model_id, record.timestamp, f"other-{i + 1:02d}")
        out.append(StampSpec(derive_pattern(sign_record(owner_key, other), spec.pattern.shape), spec.position,
                             spec.scale))
    return out


def dsn_secret(record: SerialRecord, signature: bytes, spec: StampSpec, dcfg: DSNConfig, cfg: TrainConfig
               ) -> dict[str, Any]:
    """The checkpoint's secret part: the signed record (whose signature derives k), the stamp parameters, the
    DSN configuration and the student's training recipe (`serial-eval --seeds` retrains with it)."""
    return {"serial": record.to_dict() | {"signature": signature.hex()}, **spec.to_secret(),
            "commitment": commitment(signature), "config": asdict(dcfg),
            "train": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr}}


# -- the pipeline ------------------------------------------------------------------------------------------------
def load_or_train_teacher(path: Path | None, data: Dataset, cfg: TrainConfig, model_name: str,
                          model_config: dict[str, Any] | None) -> tuple[nn.Module, float]:
    """(teacher, test accuracy): load the teacher checkpoint at `path` if it exists, else train one (and save it
    there when a path is given, mode 0600: the teacher is the owner's secret)."""
    if path is not None and Path(path).exists():
        ckpt = load_checkpoint(path)
        if ckpt.method != TEACHER_METHOD:
            raise ValueError(f"{path}: method {ckpt.method!r} is not a DSN teacher ({TEACHER_METHOD!r})")
        if ckpt.dataset != data.name:
            raise ValueError(f"{path}: teacher was trained on {ckpt.dataset!r}, not {data.name!r}")
        teacher = ckpt.build_public_model()
        return teacher, accuracy(teacher, data.x_test, data.y_test)
    teacher, epoch_s = train_new_model(data, cfg, model_name, model_config, label="dsn teacher")
    acc = accuracy(teacher, data.x_test, data.y_test)
    if path is not None:
        save_checkpoint(ProtectedCheckpoint(
            method=TEACHER_METHOD, model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
            public_state={k: v.detach().clone() for k, v in teacher.state_dict().items()}, secret={},
            dataset=data.name,
            data_config=dict(data.options), seed=cfg.seed, metrics={"teacher_acc": acc, "teacher_epoch_s": epoch_s},
            model_config=dict(model_config or {})), path)
    return teacher, acc


@dataclass(frozen=True)
class DSNTargets:
    """What a student must reach on the test split before it is written, judged against its teacher."""

    max_sn_drop: float = 0.02  # student with its SN >= teacher - this
    max_raw_acc: float = 0.2  # student on raw inputs
    max_other_acc: float = 0.2  # student with the best of the other customers' SNs

    def misses(self, m: dict[str, Any]) -> list[str]:
        """The targets metrics `m` (teacher_acc, student_sn_acc, student_raw_acc, other_sn_max_acc) miss."""
        out = []
        if m["student_sn_acc"] < m["teacher_acc"] - self.max_sn_drop:
            out.append(f"with its SN {m['student_sn_acc']:.1%} < teacher {m['teacher_acc']:.1%} - "
                       f"{100 * self.max_sn_drop:g} pts")
        if m["student_raw_acc"] > self.max_raw_acc:
            out.append(f"raw {m['student_raw_acc']:.1%} > {self.max_raw_acc:.0%}")
        if m.get("other_sn_max_acc") is not None and m["other_sn_max_acc"] > self.max_other_acc:
            out.append(f"other SNs max {m['other_sn_max_acc']:.1%} > {self.max_other_acc:.0%}")
        return out


def student_metrics(student: nn.Module, spec: StampSpec, data: Dataset, others: list[StampSpec]) -> dict[str, Any]:
    """Test accuracy with the student's SN, on raw inputs and with each of `others` (max and mean)."""
    m: dict[str, Any] = {"student_sn_acc": stamped_accuracy(student, data.x_test, data.y_test, spec),
                         "student_raw_acc": stamped_accuracy(student, data.x_test, data.y_test, None)}
    if others:
        accs = [stamped_accuracy(student, data.x_test, data.y_test, s) for s in others]
        m |= {"other_sn_max_acc": max(accs), "other_sn_mean_acc": float(np.mean(accs)), "other_sn_n": len(others)}
    return m


def _advice(misses: list[list[str]], collapsed: bool) -> str:
    if collapsed:
        return "training collapsed: try a smaller --lr or another --seed"
    if any(not m.startswith("with its SN") for miss in misses for m in miss):
        return ("raw inputs or other SNs still work: raise --student-epochs, --grl-lambda or --wrong-fraction "
                "(or loosen --max-raw-acc / --max-other-acc)")
    return "the student stays below its teacher: raise --student-epochs (or loosen --max-sn-drop)"


def train_student_checked(teacher: nn.Module, teacher_acc: float, spec: StampSpec, data: Dataset, cfg: TrainConfig,
                          dcfg: DSNConfig, model_name: str, model_config: dict[str, Any] | None, attempts: int,
                          targets: DSNTargets, others: list[StampSpec], log: Callable[[str], None]
                          ) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """train_student, then `targets` on the test split; a student that misses them is trained again with the
    next seed, up to `attempts` times. Returns (student, the config that worked, its metrics); raises
    DSNTrainingError, naming every seed and what it missed, when no attempt meets the targets."""
    same = [i + 1 for i, o in enumerate(others) if np.array_equal(o.pattern, spec.pattern)]
    if same:  # 420 balanced 3x3 patterns: 1 - (419/420)^20 = 4.7% of keys meet one of 20 other customers' exactly
        h, w = spec.pattern.shape
        raise PatternCollisionError(
            f"this customer's {h}x{w} SN pattern equals that of other customer(s) {same} of the {len(others)} "
            f"checked ({2 ** (h * w)} patterns in all): no student can tell equal stamps apart, so their SNs would "
            f"unlock it; use a larger --pattern-size (e.g. 4x4) or another --timestamp (a new pattern)")
    floor = 1.0 / data.num_classes + MIN_MARGIN_OVER_CHANCE  # below it the student has collapsed
    tried, misses = [], []
    for attempt in range(max(1, attempts)):
        run = replace(cfg, seed=cfg.seed + attempt)
        seed_everything(run.seed)
        student = create_model(model_name, data.input_shape, data.num_classes, **(model_config or {}))
        epoch_s = train_student(student, teacher, spec, data, run, dcfg)
        m = {"teacher_acc": teacher_acc, **student_metrics(student, spec, data, others), "student_epoch_s": epoch_s}
        missed = targets.misses(m)
        if not missed:
            return student, run, m | {"student_attempts": attempt + 1}
        tried.append(f"seed {run.seed}: " + "; ".join(missed))
        misses.append(missed)
        log(f"dsn student with seed {run.seed} missed its targets ({'; '.join(missed)})"
            + ("; training again with the next seed" if attempt + 1 < attempts else ""))
    collapsed = m["student_sn_acc"] < floor
    raise DSNTrainingError(f"no DSN student met its targets in {len(tried)} attempts ({' | '.join(tried)}); "
                           f"{_advice(misses, collapsed)}. The teacher is kept and reused.")


def protect_dsn(data: Dataset, out: Path, cfg: TrainConfig, owner_key: Ed25519PrivateKey, record: SerialRecord, *,
                dcfg: DSNConfig | None = None, teacher_path: Path | None = None,
                teacher_cfg: TrainConfig | None = None, pattern_size: tuple[int, int] = (3, 3),
                position: tuple[int, int] = (0, 0), model_name: str = "simple_cnn",
                model_config: dict[str, Any] | None = None, other_customers: int = 20,
                claim_out: Path | None = None, attempts: int = 3, targets: DSNTargets | None = None,
                log: Callable[[str], None] | None = None) -> ProtectedCheckpoint:
    """Teacher (loaded from `teacher_path` or trained), one customer's student, its checkpoint and claim.

    The student must meet `targets` (default: with its SN within 2 pts of the teacher, raw and the SNs of
    `other_customers` other customers of the same model at most 20%, on the test split); one that misses them
    is trained again with the next seed, up to `attempts` times, and is never written: DSNTrainingError says
    what each seed missed. The checkpoint records the seed that worked.

    Metrics: teacher_acc; student_sn_acc (stamped with the customer's SN), student_raw_acc (raw inputs),
    other_sn_max_acc / other_sn_mean_acc (other customers' SNs), student_attempts."""
    dcfg = dcfg or DSNConfig()
    signature = sign_record(owner_key, record)
    spec = StampSpec(derive_pattern(signature, pattern_size), position, stamp_scale(data.input_shape))
    spec.apply(data.x_test[:1])  # fails early, naming the sizes, if the stamp does not fit
    teacher, teacher_acc = load_or_train_teacher(teacher_path, data, teacher_cfg or cfg, model_name, model_config)
    others = other_customer_specs(owner_key, record, spec, other_customers)
    student, cfg, metrics = train_student_checked(teacher, teacher_acc, spec, data, cfg, dcfg, model_name,
                                                  model_config, attempts, targets or DSNTargets(), others,
                                                  log or (lambda msg: print(msg, file=sys.stderr)))
    ckpt = ProtectedCheckpoint(
        method="dsn", model_name=model_name, input_shape=data.input_shape, num_classes=data.num_classes,
        public_state={k: v.detach().clone() for k, v in student.state_dict().items()},
        secret=dsn_secret(record, signature, spec, dcfg, cfg), dataset=data.name,
        data_config=dict(data.options), seed=cfg.seed, metrics=metrics,
        model_config=dict(model_config or {}))
    save_checkpoint(ckpt, out)
    write_claim(make_claim(owner_key, "dsn", record, signature, pattern_size=pattern_size),
                claim_out or serial_path(out))
    return ckpt


def stamp_spec(ckpt: ProtectedCheckpoint) -> StampSpec:
    ckpt.require_method("dsn")
    return StampSpec.from_secret(ckpt.secret)
