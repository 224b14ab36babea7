"""`sealnet serial-eval`: the DSN paper's and the serial-number watermark paper's measurements in one report.

DSN (a `--method dsn` checkpoint): teacher vs student with its SN, raw, with other customers' SNs, and every
pattern of the same size at the same position (a pirate's exhaustive search); the attacks of the DSN paper,
each with 10-40% of the training data: fine-tuning on raw inputs vs the same network trained from scratch
(learning curves for both), transfer learning (new fully connected layers on the frozen convolutions), L1
global pruning 10-40% (accuracy with / without SN), overwriting with a new SN (the attacker knows the scheme and
the old SN; CE on the new SN since the teacher is secret, SN-embedding loss on inputs with the old SN). Ours:
re-centring (the first fully connected layer's bias shifted so each unit has mean pre-activation 0 on the
subset's images, labels unused, no training) and `stamp_effect`, how constant the stamp's effect on that layer
is across images, which explains why fine-tuning beats training from scratch (docs/serial.md).
Watermark (a `--method watermark` checkpoint): query(T) == i, task accuracy vs the plain baseline, L1 global
pruning 10-90%, and false positives: N plain models trained with other seeds, none may answer T with i.

The functions take models and, for the deployed path, a `predict(x) -> logits` callable (a gRPC client whose
trusted module stamps inputs), so the same report runs on a bundle or an endpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn
from torch.nn.utils import prune
from tqdm import tqdm

from sealnet.data import Dataset
from sealnet.evaluate.multiseed import flatten, spread, summarize
from sealnet.protect.checkpoint import ProtectedCheckpoint, load_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.serial import (
    DSNConfig,
    DSNTrainingError,
    PatternCollisionError,
    grad_reverse,
    grl_ramp,
    make_gd,
    other_customer_specs,
    protect_dsn,
    split_student,
    stamp_spec,
    stamp_torch,
    stamped_accuracy,
)
from sealnet.protect.train import TrainConfig, accuracy, seed_everything, train_new_model
from sealnet.protect.watermark import WatermarkConfig, check_watermark, protect_watermark
from sealnet.serial import DSN_CLAIM, SerialRecord
from sealnet.stamp import StampSpec

Predict = Callable[[np.ndarray], np.ndarray]
FRACTIONS = (0.1, 0.2, 0.3, 0.4)
DSN_PRUNE_RATES = (0.1, 0.2, 0.3, 0.4)
WATERMARK_PRUNE_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def predict_accuracy(predict: Predict, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> float:
    """Accuracy of any `predict(x) -> logits or labels`: a gRPC client, an ONNX session, a torch model."""
    preds = []
    for i in range(0, len(x), batch_size):
        out = np.asarray(predict(x[i : i + batch_size]))
        preds.append(out.argmax(1) if out.ndim == 2 else out.reshape(-1))
    return float((np.concatenate(preds) == y).mean())


def l1_pruned(model: nn.Module, rate: float) -> nn.Module:
    """A copy with the `rate` fraction of smallest-|w| conv/linear weights, across the whole model, set to zero
    (L1-norm global unstructured pruning, as both papers)."""
    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, nn.Conv2d | nn.Linear)]
    if rate > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=rate)
        for mod, name in params:
            prune.remove(mod, name)
    return m.eval()


def _subset(data: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = max(data.num_classes, round(fraction * len(data.x_train)))
    idx = np.random.default_rng(seed).permutation(len(data.x_train))[:n]
    return data.x_train[idx], data.y_train[idx]


def train_curve(model: nn.Module, params: Iterable[nn.Parameter], x: np.ndarray, y: np.ndarray,
                evaluate: Callable[[nn.Module], float], *, steps: int, eval_every: int, seed: int, lr: float = 1e-3,
                batch_size: int = 64) -> list[tuple[int, float]]:
    """Adam CE steps on seeded minibatches of (x, y); [(step, evaluate(model))] every `eval_every` steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    curve = [(0, evaluate(model))]
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(xt), (min(batch_size, len(xt)),), generator=gen)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model)))
    model.eval()
    return curve


# -- DSN -----------------------------------------------------------------------------------------------------------
def exhaustive_patterns(model: nn.Module, spec: StampSpec, x: np.ndarray, y: np.ndarray, max_bits: int = 12
                        ) -> dict[str, Any] | None:
    """A pirate who knows the position tries every pattern of the SN's size: how many unlock the model?"""
    h, w = spec.pattern.shape
    bits = h * w
    if bits > max_bits:
        return None
    accs = np.zeros(2**bits)
    for code in range(2**bits):
        p = ((code >> np.arange(bits)) & 1).astype(np.uint8).reshape(h, w)
        accs[code] = stamped_accuracy(model, x, y, StampSpec(p, spec.position, spec.scale))
    true_code = int((spec.pattern.reshape(-1).astype(np.int64) << np.arange(bits)).sum())
    others = np.delete(accs, true_code)
    return {"patterns": 2**bits, "images": int(len(y)), "true_acc": float(accs[true_code]),
            "best_other_acc": float(others.max()), "others_above_50": int((others > 0.5).sum()),
            "others_above_20": int((others > 0.2).sum()), "best_is_true": bool(accs.argmax() == true_code)}


def overwrite_attack(student: nn.Module, spec: StampSpec, x: np.ndarray, y: np.ndarray, data: Dataset, *,
                     steps: int, seed: int, dcfg: DSNConfig, lr: float = 1e-3, batch_size: int = 64
                     ) -> dict[str, Any]:
    """DSN paper, 'overwriting': embed a new SN k* with the DSN recipe (CE on k*-stamped inputs, the teacher
    being secret) and remove the old one (SN-embedding loss through a GRL on inputs stamped with the old k and
    on raw inputs). The GRL weight ramps up as in training but only over the second half of the steps: switched
    on from the start, it kills every hidden unit before the new SN opens them, and the student stays at chance
    whatever the SN (measured: 10% after 1,000 steps)."""
    rng = np.random.default_rng(seed + 99)
    new = spec.pattern
    while np.array_equal(new, spec.pattern):
        new = rng.integers(0, 2, spec.pattern.shape).astype(np.uint8)
    new_spec = StampSpec(new, spec.position, spec.scale)
    m = copy.deepcopy(student)
    ge, gy = split_student(m)
    gd = make_gd(m, data.input_shape, data.num_classes, dcfg.gd_hidden)
    opt = torch.optim.Adam(list(m.parameters()) + list(gd.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    k_new, k_old = torch.from_numpy(new), torch.from_numpy(spec.pattern)
    m.train()
    gd.train()
    for i in range(steps):
        idx = torch.randint(0, len(xt), (min(batch_size, len(xt)),), generator=gen)
        xb, yb = xt[idx], yt[idx]
        half = len(xb) // 2
        x_neg = torch.cat([stamp_torch(xb[:half], k_old, spec.position, spec.scale), xb[half:]])
        feats = ge(torch.cat([stamp_torch(xb, k_new, spec.position, spec.scale), x_neg]))
        loss = F.cross_entropy(gy(feats[: len(xb)]), yb) + F.cross_entropy(
            gd(grad_reverse(feats[len(xb) :], dcfg.grl_lambda * grl_ramp(max(0.0, 2 * i / max(steps, 1) - 1)))), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    return {"new_sn_acc": stamped_accuracy(m, data.x_test, data.y_test, new_spec),
            "old_sn_acc": stamped_accuracy(m, data.x_test, data.y_test, spec),
            "raw_acc": stamped_accuracy(m, data.x_test, data.y_test, None)}


def first_linear_preactivations(model: nn.Module, x: np.ndarray) -> tuple[nn.Linear, torch.Tensor]:
    """The model's first fully connected layer and its outputs (pre-activations) on `x`, in eval mode."""
    layer = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no fully connected layer")
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        handle.remove()
    return layer, captured[0]


def recentred(model: nn.Module, x: np.ndarray) -> nn.Module:
    """A copy whose first fully connected layer has mean pre-activation 0 per unit over the unlabelled `x`
    (the torch twin of the attack suite's dsn-recenter)."""
    m = copy.deepcopy(model)
    layer, pre = first_linear_preactivations(m, x)
    with torch.no_grad():
        layer.bias -= pre.mean(0)
    return m


def stamp_effect(model: nn.Module, spec: StampSpec, x: np.ndarray) -> dict[str, Any]:
    """How the stamp changes the first fully connected layer: per unit, the mean change over `x` and how much
    that change varies between images. A change that is the same for every image is a bias in disguise."""
    _, raw = first_linear_preactivations(model, x)
    _, sn = first_linear_preactivations(model, spec.apply(x))
    delta = sn - raw
    return {"images": int(len(x)), "units": int(delta.shape[1]),
            "mean_abs_shift": float(delta.mean(0).abs().mean()), "mean_per_image_std": float(delta.std(0).mean()),
            "units_on_raw": float((raw > 0).float().mean()), "units_on_sn": float((sn > 0).float().mean())}


def _fresh_classifier(model: nn.Module, seed: int) -> nn.Module:
    """Transfer learning: the same network with every fully connected layer re-initialised, convolutions frozen."""
    m = copy.deepcopy(model)
    seed_everything(seed)
    for mod in m.classifier.modules():
        if isinstance(mod, nn.Linear):
            mod.reset_parameters()
    for p in m.features.parameters():
        p.requires_grad_(False)
    return m


def dsn_eval(ckpt: ProtectedCheckpoint, data: Dataset, *, teacher: nn.Module | None = None,
             owner_key: Ed25519PrivateKey | None = None, n_others: int = 20, fractions: tuple[float, ...] = FRACTIONS,
             steps: int = 300, eval_every: int = 25, prune_rates: tuple[float, ...] = DSN_PRUNE_RATES,
             exhaustive_images: int = 300, grpc_predict: Predict | None = None, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Every DSN measurement of the module docstring (accuracies are on the test split)."""
    spec = stamp_spec(ckpt)
    student = ckpt.build_public_model()
    xte, yte = data.x_test, data.y_test

    def raw_acc(m: nn.Module) -> float:
        return accuracy(m, xte, yte)

    r: dict[str, Any] = {
        "model": ckpt.model_name, "pattern_size": list(spec.pattern.shape), "position": list(spec.position),
        "scale": spec.scale, "customer_id": ckpt.secret["serial"]["customer_id"],
        "teacher_acc": raw_acc(teacher) if teacher is not None else ckpt.metrics.get("teacher_acc"),
        "student_sn_acc": stamped_accuracy(student, xte, yte, spec), "student_raw_acc": raw_acc(student),
        "grpc_acc": None if grpc_predict is None else predict_accuracy(grpc_predict, xte, yte),
    }
    if owner_key is not None:
        others = other_customer_specs(owner_key, SerialRecord.from_dict(
            {k: v for k, v in ckpt.secret["serial"].items() if k != "signature"}), spec, n_others)
        r["other_sn_source"] = f"{n_others} other customers of the same owner and model (customer ids other-NN)"
    else:
        rng = np.random.default_rng(seed + 1)
        others = []
        while len(others) < n_others:
            p = rng.integers(0, 2, spec.pattern.shape).astype(np.uint8)
            if not np.array_equal(p, spec.pattern):
                others.append(StampSpec(p, spec.position, spec.scale))
        r["other_sn_source"] = f"{n_others} random patterns (no --owner-key given)"
    r["other_sn_accs"] = [stamped_accuracy(student, xte, yte, s) for s in others]
    r["other_sn_hamming"] = [int((s.pattern != spec.pattern).sum()) for s in others]
    r["other_sn_max_acc"] = max(r["other_sn_accs"]) if others else None
    r["exhaustive"] = exhaustive_patterns(student, spec, xte[:exhaustive_images], yte[:exhaustive_images])
    r["stamp_effect"] = stamp_effect(student, spec, _subset(data, fractions[0] if fractions else 0.1, seed)[0])
    r["pruning"] = []
    for rate in tqdm(prune_rates, desc="dsn pruning", disable=not progress, unit="rate"):
        m = l1_pruned(student, rate)
        r["pruning"].append({"rate": rate, "sn_acc": stamped_accuracy(m, xte, yte, spec), "raw_acc": raw_acc(m)})
    dcfg = DSNConfig(**ckpt.secret.get("config", {}))
    r["attacks"] = []
    bar = tqdm(total=4 * len(fractions), desc="dsn attacks", disable=not progress, unit="run")
    for frac in fractions:
        x, y = _subset(data, frac, seed)
        row: dict[str, Any] = {"fraction": frac, "images": int(len(y)), "steps": steps,
                               "recenter_acc": raw_acc(recentred(student, x))}
        seed_everything(seed)  # dropout draws from the global generator
        ft = copy.deepcopy(student)
        row["finetune_curve"] = train_curve(ft, ft.parameters(), x, y, raw_acc, steps=steps, eval_every=eval_every,
                                            seed=seed)
        bar.update(1)
        seed_everything(seed + 3)
        scratch = create_model(ckpt.model_name, ckpt.input_shape, ckpt.num_classes, **ckpt.model_config)
        row["scratch_curve"] = train_curve(scratch, scratch.parameters(), x, y, raw_acc, steps=steps,
                                           eval_every=eval_every, seed=seed)
        bar.update(1)
        tl = _fresh_classifier(student, seed + 4)  # seeds the global generator
        row["transfer_curve"] = train_curve(tl, [p for p in tl.parameters() if p.requires_grad], x, y, raw_acc,
                                            steps=steps, eval_every=eval_every, seed=seed)
        bar.update(1)
        seed_everything(seed + 5)
        row["overwrite"] = overwrite_attack(student, spec, x, y, data, steps=steps, seed=seed, dcfg=dcfg)
        bar.update(1)
        for name in ("finetune", "scratch", "transfer"):
            row[f"{name}_acc"] = row[f"{name}_curve"][-1][1]
        r["attacks"].append(row)
    bar.close()
    return r


# -- watermark -----------------------------------------------------------------------------------------------------
def watermark_eval(ckpt: ProtectedCheckpoint, data: Dataset, *, n_plain: int = 20, plain_epochs: int = 2,
                   prune_rates: tuple[float, ...] = WATERMARK_PRUNE_RATES, seed: int = 0, progress: bool = True
                   ) -> dict[str, Any]:
    """query(T) == i on the watermarked model, pruned copies of it, and `n_plain` plain models."""
    ckpt.require_method("watermark")
    s = ckpt.secret
    trigger = s["trigger"].numpy()
    serial = np.asarray(s["serial"], np.float32)
    tol, min_rate = float(s["tolerance"]), float(s["min_rate"])
    model = ckpt.build_public_model()
    found = check_watermark(model, trigger, serial, tol, min_rate)
    r: dict[str, Any] = {
        "model": ckpt.model_name, "trigger_images": int(len(trigger)), "serial": [float(v) for v in serial],
        "tolerance": tol, "min_rate": min_rate, "baseline_acc": ckpt.metrics.get("baseline_acc"),
        "watermark_task_acc": accuracy(model, data.x_test, data.y_test), "watermark_rate": found.rate,
        "watermark_match": found.matched, "watermark_max_deviation": found.max_deviation,
    }
    r["pruning"] = []
    for rate in tqdm(prune_rates, desc="watermark pruning", disable=not progress, unit="rate"):
        m = l1_pruned(model, rate)
        f = check_watermark(m, trigger, serial, tol, min_rate)
        r["pruning"].append({"rate": rate, "task_acc": accuracy(m, data.x_test, data.y_test), "sn_rate": f.rate,
                             "match": f.matched, "max_deviation": f.max_deviation})
    r["plain_models"] = []
    for j in tqdm(range(n_plain), desc="plain models", disable=not progress, unit="model"):
        plain, _ = train_new_model(data, TrainConfig(epochs=plain_epochs, seed=seed + 1000 + j, progress=False),
                                   ckpt.model_name, ckpt.model_config)
        f = check_watermark(plain, trigger, serial, tol, min_rate)
        r["plain_models"].append({"seed": seed + 1000 + j, "acc": accuracy(plain, data.x_test, data.y_test),
                                  "sn_rate": f.rate, "match": f.matched,
                                  "median_deviation": f.median_deviation})
    r["plain_false_positives"] = sum(p["match"] for p in r["plain_models"])
    r["plain_best_sn_rate"] = max((p["sn_rate"] for p in r["plain_models"]), default=None)
    r["plain_min_median_deviation"] = min((p["median_deviation"] for p in r["plain_models"]), default=None)
    return r


# -- the report ----------------------------------------------------------------------------------------------------
def _at(attacks: list[dict[str, Any]], frac: float, key: str) -> float | None:
    return next((row[key] for row in attacks if abs(row["fraction"] - frac) < 1e-9), None)


@contextlib.contextmanager
def deployed_predict(checkpoint: Path, data_dir: Path | None = None) -> Iterator[Predict]:
    """predict(x) -> logits through the real data path: the DSN checkpoint exported with a fresh key and
    keystore, the trusted module and the KServe v2 runtime served locally, queried over gRPC with a license
    carrying the student's customer id and serial number (the module stamps the inputs)."""
    from sealnet.deployment import LocalDeployment
    from sealnet.protect.checkpoint import load_checkpoint
    from sealnet.serial import license_serial_number

    secret = load_checkpoint(checkpoint).secret
    with LocalDeployment.export(checkpoint, data_dir=data_dir) as dep:
        token = dep.license(secret["serial"]["customer_id"], license_serial_number(secret["commitment"]))
        yield lambda x: dep.predict(x, token)


def run_serial_eval(data: Dataset, out_dir: Path, *, dsn: ProtectedCheckpoint | None = None,
                    watermark: ProtectedCheckpoint | None = None, dsn_kwargs: dict[str, Any] | None = None,
                    watermark_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run what is given; write serial_eval.json / .md / .png (+ serial_curves.png) to out_dir; return the
    report. The summary keys are at the top level (None where the checkpoint was not given)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = dsn_eval(dsn, data, **(dsn_kwargs or {})) if dsn is not None else None
    w = watermark_eval(watermark, data, **(watermark_kwargs or {})) if watermark is not None else None
    attacks = d["attacks"] if d else []
    r: dict[str, Any] = {
        "dataset": data.name, "test_images": int(len(data.y_test)),
        "teacher_acc": d and d["teacher_acc"], "student_sn_acc": d and d["student_sn_acc"],
        "student_raw_acc": d and d["student_raw_acc"], "other_sn_max_acc": d and d["other_sn_max_acc"],
        "grpc_acc": d and d["grpc_acc"],
        "finetune10_acc": _at(attacks, 0.1, "finetune_acc"), "scratch10_acc": _at(attacks, 0.1, "scratch_acc"),
        "transfer10_acc": _at(attacks, 0.1, "transfer_acc"), "recenter10_acc": _at(attacks, 0.1, "recenter_acc"),
        "watermark_match": w and w["watermark_match"], "watermark_task_acc": w and w["watermark_task_acc"],
        "watermark_baseline_acc": w and w["baseline_acc"], "plain_false_positives": w and w["plain_false_positives"],
        "dsn": d, "watermark": w,
    }
    r["eval_seconds"] = time.perf_counter() - t0
    (out_dir / "serial_eval.json").write_text(json.dumps(r, indent=2))
    (out_dir / "serial_eval.md").write_text(markdown_report(r))
    write_plots(r, out_dir)
    return r


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def markdown_report(r: dict[str, Any]) -> str:
    lines = [f"# Serial-number evaluation on {r['dataset']} ({r['test_images']} test images)", ""]
    d, w = r["dsn"], r["watermark"]
    if d:
        lines += [f"## DSN ({d['model']}, {d['pattern_size'][0]}x{d['pattern_size'][1]} pattern at "
                  f"{tuple(d['position'])}, scale {d['scale']}, customer {d['customer_id']!r})", "",
                  "| measurement | accuracy |", "|---|---|",
                  f"| teacher (raw inputs) | {_pct(d['teacher_acc'])} |",
                  f"| student with its SN | {_pct(d['student_sn_acc'])} |",
                  f"| student on raw inputs (no SN) | {_pct(d['student_raw_acc'])} |",
                  f"| student with other SNs: max of {len(d['other_sn_accs'])} ({d['other_sn_source']}) | "
                  f"{_pct(d['other_sn_max_acc'])} |",
                  f"| deployed over gRPC (trusted module stamps) | {_pct(d['grpc_acc'])} |"]
        ex = d["exhaustive"]
        if ex:
            lines.append(f"| exhaustive search, all {ex['patterns']} patterns at the known position "
                         f"({ex['images']} images): best wrong pattern | {_pct(ex['best_other_acc'])} "
                         f"({ex['others_above_50']} wrong patterns > 50%, {ex['others_above_20']} > 20%; "
                         f"true SN found: {ex['best_is_true']}) |")
        se = d["stamp_effect"]
        lines += ["", f"Stamp's effect on the first fully connected layer ({se['units']} units, {se['images']} "
                  f"images): mean |shift| {se['mean_abs_shift']:.3f}, varying between images by "
                  f"{se['mean_per_image_std']:.3f} (std); units on: raw {_pct(se['units_on_raw'])}, with SN "
                  f"{_pct(se['units_on_sn'])}."]
        lines += ["", "### Attacks (test accuracy on raw inputs unless noted)", "",
                  "| data | images | fine-tuning | from scratch | transfer (new FC, frozen conv) | "
                  "re-centring (no labels, no training) | overwrite: new SN / old SN / raw |",
                  "|---|---|---|---|---|---|---|"]
        for row in d["attacks"]:
            o = row["overwrite"]
            lines.append(f"| {row['fraction']:.0%} | {row['images']} | {_pct(row['finetune_acc'])} | "
                         f"{_pct(row['scratch_acc'])} | {_pct(row['transfer_acc'])} | {_pct(row['recenter_acc'])} | "
                         f"{_pct(o['new_sn_acc'])} / {_pct(o['old_sn_acc'])} / {_pct(o['raw_acc'])} |")
        if d["attacks"]:
            lines += ["", f"Each training attack: {d['attacks'][0]['steps']} Adam steps (lr 1e-3, batch 64) on "
                      "the subset; re-centring uses the subset's images without labels."]
        lines += ["", "### L1 global pruning", "", "| rate | with SN | raw |", "|---|---|---|"]
        lines += [f"| {row['rate']:.0%} | {_pct(row['sn_acc'])} | {_pct(row['raw_acc'])} |" for row in d["pruning"]]
        lines.append("")
    if w:
        lines += [f"## Serial-number watermark ({w['model']}, {w['trigger_images']} trigger images, tolerance "
                  f"±{w['tolerance']:g}, i = {w['serial']})", "",
                  "| measurement | value |", "|---|---|",
                  f"| plain baseline, same recipe | {_pct(w['baseline_acc'])} |",
                  f"| watermarked model, task accuracy | {_pct(w['watermark_task_acc'])} |",
                  f"| trigger images answered with i | {_pct(w['watermark_rate'])} (match: {w['watermark_match']}, "
                  f"max deviation {w['watermark_max_deviation']:.3f}) |",
                  f"| plain models matched (false positives) | {w['plain_false_positives']} of "
                  f"{len(w['plain_models'])} (best share of T within tolerance {_pct(w['plain_best_sn_rate'])}, "
                  f"smallest median deviation {w['plain_min_median_deviation']:.2f}) |", "",
                  "### L1 global pruning", "", "| rate | task accuracy | trigger images answered with i | match |",
                  "|---|---|---|---|"]
        lines += [f"| {row['rate']:.0%} | {_pct(row['task_acc'])} | {_pct(row['sn_rate'])} | {row['match']} |"
                  for row in w["pruning"]]
        lines.append("")
    lines += [f"Evaluation took {r['eval_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write_plots(r: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, w = r["dsn"], r["watermark"]
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if d:
        names = ["teacher", "student + SN", "raw", "other SNs (max)"]
        vals = [d["teacher_acc"] or 0, d["student_sn_acc"], d["student_raw_acc"], d["other_sn_max_acc"] or 0]
        axes[0].bar(names, [100 * v for v in vals], color=["tab:gray", "tab:green", "tab:red", "tab:orange"])
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].set_title("DSN")
        fr = [100 * row["fraction"] for row in d["attacks"]]
        for key, label in (("finetune_acc", "fine-tuning"), ("scratch_acc", "from scratch"),
                           ("transfer_acc", "transfer (new FC)"), ("recenter_acc", "re-centring (no labels)")):
            axes[1].plot(fr, [100 * row[key] for row in d["attacks"]], "o-", label=label)
        axes[1].plot(fr, [100 * row["overwrite"]["new_sn_acc"] for row in d["attacks"]], "s--",
                     label="overwrite (new SN)")
        axes[1].set_xlabel("training data available to the attacker (%)")
        axes[1].set_ylabel("test accuracy (%)")
        axes[1].set_title("DSN attacks")
        axes[1].legend(fontsize=8)
        rates = [100 * row["rate"] for row in d["pruning"]]
        axes[2].plot(rates, [100 * row["sn_acc"] for row in d["pruning"]], "o-", label="DSN with SN")
        axes[2].plot(rates, [100 * row["raw_acc"] for row in d["pruning"]], "o--", label="DSN raw")
    if w:
        rates = [100 * row["rate"] for row in w["pruning"]]
        axes[2].plot(rates, [100 * row["task_acc"] for row in w["pruning"]], "s-", label="watermark: task")
        axes[2].plot(rates, [100 * row["sn_rate"] for row in w["pruning"]], "s--", label="watermark: T -> i")
    axes[2].set_xlabel("L1 global pruning rate (%)")
    axes[2].set_ylabel("%")
    axes[2].set_title("pruning")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "serial_eval.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if d and d["attacks"]:
        fig, axes = plt.subplots(1, len(d["attacks"]), figsize=(4 * len(d["attacks"]), 3.6), squeeze=False)
        for ax, row in zip(axes[0], d["attacks"], strict=True):
            for key, label in (("finetune_curve", "fine-tuning the student"), ("scratch_curve", "from scratch"),
                               ("transfer_curve", "transfer (new FC)")):
                steps, accs = zip(*row[key], strict=True)
                ax.plot(steps, [100 * a for a in accs], label=label)
            ax.set_title(f"{row['fraction']:.0%} of the data ({row['images']} images)")
            ax.set_xlabel("step")
            ax.set_ylabel("test accuracy, raw inputs (%)")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "serial_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -- several seeds ---------------------------------------------------------------------------------------------------
SEED_TABLE = (  # (flattened metric, label) for the Markdown summary of `serial-eval --seeds`
    ("teacher_acc", "DSN teacher"), ("student_sn_acc", "DSN student with its SN"),
    ("student_raw_acc", "DSN student on raw inputs"), ("other_sn_max_acc", "DSN student with other SNs (max)"),
    ("dsn.exhaustive.best_other_acc", "DSN: best wrong pattern, exhaustive search"),
    ("grpc_acc", "DSN deployed over gRPC"), ("finetune10_acc", "DSN fine-tuning, 10% of the data"),
    ("scratch10_acc", "from scratch, 10% of the data"), ("transfer10_acc", "transfer learning, 10% of the data"),
    ("recenter10_acc", "re-centring, 10% of the images (no labels)"),
    ("watermark_baseline_acc", "watermark: plain baseline"), ("watermark_task_acc", "watermark: task accuracy"),
    ("watermark.watermark_rate", "watermark: trigger images answered with i"),
    ("plain_false_positives", "watermark: plain models matched (count)"),
)


def _recipe(ckpt: ProtectedCheckpoint, seed: int) -> TrainConfig:
    train = ckpt.secret.get("train")
    if not isinstance(train, dict):
        raise ValueError(f"the {ckpt.method} checkpoint does not record its training recipe (written by an older "
                         "sealnet protect): protect it again to evaluate it over several seeds")
    return TrainConfig(epochs=int(train["epochs"]), batch_size=int(train["batch_size"]), lr=float(train["lr"]),
                       seed=seed, progress=False)


KEY_DRAWS = 20  # fresh keys tried for a DSN run before giving up (each collides with probability ~4%)


def _retrain(kind: str, ckpt: ProtectedCheckpoint, data: Dataset, out: Path, seed: int,
             teacher_path: Path | None, attempts: int = 3) -> tuple[ProtectedCheckpoint, Ed25519PrivateKey]:
    """A new model with `ckpt`'s recipe, a fresh random owner key (so a new SN pattern / serial vector) and
    training seed `seed`. A DSN key whose pattern equals another checked customer's (~4% of 3x3 keys) is
    refused before training and replaced by the next fresh key: the run measures training, not key luck."""
    key = Ed25519PrivateKey.generate()
    cfg = _recipe(ckpt, seed)
    if kind == DSN_CLAIM:
        spec = stamp_spec(ckpt)
        record = SerialRecord.from_dict({k: v for k, v in ckpt.secret["serial"].items() if k != "signature"})
        for _ in range(KEY_DRAWS):
            try:
                return protect_dsn(data, out / "dsn.pt", cfg, key, record, dcfg=DSNConfig(**ckpt.secret["config"]),
                                   teacher_path=teacher_path, pattern_size=spec.pattern.shape,
                                   position=spec.position, model_name=ckpt.model_name,
                                   model_config=ckpt.model_config, attempts=attempts, log=lambda _: None), key
            except PatternCollisionError:
                key = Ed25519PrivateKey.generate()
        raise DSNTrainingError(f"{KEY_DRAWS} fresh owner keys in a row gave SN patterns equal to other customers'")
    record = SerialRecord.from_dict(ckpt.secret["record"])
    return protect_watermark(data, out / "wm.pt", cfg, key, record, wcfg=WatermarkConfig(**ckpt.secret["config"]),
                             model_name=ckpt.model_name, model_config=ckpt.model_config), key


def run_serial_eval_seeds(data: Dataset, out_dir: Path, seeds: int, *, dsn: ProtectedCheckpoint | None = None,
                          teacher_path: Path | None = None, watermark: ProtectedCheckpoint | None = None,
                          dsn_kwargs: dict[str, Any] | None = None, watermark_kwargs: dict[str, Any] | None = None,
                          deploy: bool = True, seed: int = 0, attempts: int = 3,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """`seeds` runs of run_serial_eval, each on models trained anew with the given checkpoints' recipes, a fresh
    random owner key and training seed checkpoint seed + i (DSN students from the teacher at `teacher_path`);
    evaluation seed `seed` + i. Writes OUT/seed-i/ per run and OUT/serial_eval_seeds.{json,md}: mean, min and
    max of every measurement. A DSN student that misses its targets in every attempt is a failed run, listed,
    not dropped silently."""
    if dsn is not None and (teacher_path is None or not Path(teacher_path).exists()):
        raise ValueError("serial-eval --seeds trains new DSN students: give --teacher, the teacher checkpoint")
    out_dir = Path(out_dir)
    runs, failed = [], []
    for i in range(seeds):
        run_dir = out_dir / f"seed-{i}"
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        d_ckpt = d_key = None
        try:
            if dsn is not None:
                d_ckpt, d_key = _retrain("dsn", dsn, data, run_dir, dsn.seed + i, teacher_path, attempts)
        except DSNTrainingError as exc:
            failed.append({"run": i, "error": str(exc)})
            log(f"seed run {i}: {exc}")
            continue
        w_ckpt = _retrain("watermark", watermark, data, run_dir, watermark.seed + i, None)[0] if watermark else None
        dk = dict(dsn_kwargs or {}) | {"owner_key": d_key, "seed": seed + i}
        if d_ckpt is not None:
            dk["teacher"] = load_checkpoint(teacher_path).build_public_model()
        with contextlib.ExitStack() as stack:
            if d_ckpt is not None and deploy:
                dk["grpc_predict"] = stack.enter_context(deployed_predict(run_dir / "dsn.pt"))
            r = run_serial_eval(data, run_dir, dsn=d_ckpt, watermark=w_ckpt, dsn_kwargs=dk,
                                watermark_kwargs=dict(watermark_kwargs or {}) | {"seed": seed + i})
        runs.append({"run": i, "train_seed_offset": i, "eval_seed": seed + i, "seconds": time.perf_counter() - t0,
                     "metrics": flatten({k: v for k, v in r.items() if k not in ("dataset", "test_images")})})
        log(f"seed run {i}: done in {runs[-1]['seconds']:.0f} s")
    report = {"dataset": data.name, "seeds": seeds, "completed": len(runs), "failed": failed, "runs": runs,
              "summary": summarize([r["metrics"] for r in runs])}
    (out_dir / "serial_eval_seeds.json").write_text(json.dumps(report, indent=2))
    (out_dir / "serial_eval_seeds.md").write_text(seeds_markdown(report))
    return report


def seeds_markdown(report: dict[str, Any]) -> str:
    """The summary as a table: mean [min, max] over the completed runs."""
    s = report["summary"]
    lines = [f"# Serial-number evaluation over {report['seeds']} seeds on {report['dataset']} "
             f"({report['completed']} completed, {len(report['failed'])} failed)", "",
             "| measurement | mean [min, max] |", "|---|---|"]
    for key, label in SEED_TABLE:
        if key in s:
            lines.append(f"| {label} | {spread(s[key], percent=key != 'plain_false_positives')} |")
    lines += _rows_table(s, "dsn.attacks", "DSN attack (raw inputs unless noted)", (
        ("finetune_acc", "fine-tuning"), ("scratch_acc", "same network from scratch"),
        ("transfer_acc", "transfer learning (new FC, frozen conv)"), ("recenter_acc", "re-centring (no labels)"),
        ("overwrite.new_sn_acc", "overwriting: new SN"), ("overwrite.old_sn_acc", "overwriting: old SN"),
        ("overwrite.raw_acc", "overwriting: raw")), "fraction")
    lines += _rows_table(s, "dsn.pruning", "DSN, L1 global pruning", (("sn_acc", "with SN"), ("raw_acc", "raw")),
                         "rate")
    lines += _rows_table(s, "watermark.pruning", "watermark, L1 global pruning", (
        ("task_acc", "task accuracy"), ("sn_rate", "trigger images answered with i")), "rate")
    lines += [f"- failed run {f['run']}: {f['error']}" for f in report["failed"]]
    return "\n".join([*lines, ""])


def _rows_table(s: dict[str, Any], prefix: str, title: str, cols: tuple[tuple[str, str], ...], what: str
                ) -> list[str]:
    """One column per row value (fraction or rate) of a flattened per-row table, mean [min, max] in each cell."""
    row = re.compile(re.escape(prefix) + r"@(-?\d+(?:\.\d+)?(?:e-?\d+)?)\.")
    values = sorted({float(m.group(1)) for m in map(row.match, s) if m})
    if not values:
        return []
    head = " | ".join(f"{v:.0%}" for v in values)
    lines = ["", f"| {title} ({what}) | {head} |", "|---|" + "---|" * len(values)]
    for col, label in cols:
        cells = [spread(s.get(f"{prefix}@{v:g}.{col}")) for v in values]
        if any(c != "n/a" for c in cells):
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines
