"""Attacks on passport bundles (scheme V1): what the copied public network gives without the trusted module,
guessed scale/bias, and the insider who reads gamma/beta off the runtime's side of the protocol.

The white-box attacks of the passport papers (fake passports against the checkpoint, reverse engineering with
training data, sign flips, pruning, fine-tuning) need the protected checkpoint and live in `sealnet
passport-eval`; the suite works from what a deployment exposes: the bundle and the services.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attacks.base import Budget, Metric, Outcome, Target, pct, progress
from attacks.plots import histogram
from attacks.registry import register_attack

DIRECT_PIRACY_MAX = 0.15  # docs/security.md target: direct piracy <= 15%
FAKE_MAX = 0.20  # docs/security.md target: fake passports max <= 20%
UTILITY_MARGIN = 0.01


def _param_shapes(target: Target) -> dict[str, tuple[int, ...]]:
    names = set(target.bundle.manifest["passport_params"])
    return {i.name: tuple(i.dims) for i in target.public_model.graph.initializer if i.name in names}


@register_attack(
    "passport-utility", suite="model", methods=("passport",), title="Authorized accuracy vs the baseline (passports)",
    targets="authorized accuracy >= baseline - 1 pt",
    knowledge="Not an attack: licensed inference (public.onnx with the trusted module's gamma/beta) vs the plain "
              "counterpart's accuracy recorded at training time.")
def passport_utility(target: Target, budget: Budget, out: Path) -> Outcome:
    authorized, source = target.authorized_accuracy()
    baseline = target.bundle.manifest.get("training", {}).get("baseline_acc")
    metrics = [Metric("authorized_acc", authorized, note=source)]
    if baseline is not None:
        metrics = [Metric("authorized_acc", authorized, ">=", baseline - UTILITY_MARGIN,
                          note=f"{source}; target: within 1 pt of the baseline {pct(baseline)}"),
                   Metric("baseline_acc", float(baseline), note="plain counterpart, recorded at training time")]
    return Outcome(metrics)


@register_attack(
    "passport-direct-piracy", suite="model", methods=("passport",),
    title="Direct piracy: public.onnx with the shipped or the natural gamma/beta",
    targets="accuracy <= 15% with shipped zeros and with gamma=1, beta=0",
    knowledge="A1 pirate: has public.onnx and labelled test images; no trusted module, no license.")
def passport_direct_piracy(target: Target, budget: Budget, out: Path) -> Outcome:
    shapes = _param_shapes(target)
    unit = {n: (np.ones if n.startswith("gamma") else np.zeros)(s, np.float32) for n, s in shapes.items()}
    return Outcome([
        Metric("shipped_params_acc", target.public_accuracy(target.data.x_test), "<=", DIRECT_PIRACY_MAX,
               note="public.onnx as copied (gamma = beta = 0)"),
        Metric("unit_params_acc", target.accuracy_with_params(unit), "<=", DIRECT_PIRACY_MAX,
               note="gamma = 1, beta = 0: a normalisation without affine"),
    ])


@register_attack(
    "passport-random-params", suite="model", methods=("passport",),
    title="Fake parameters: random gamma/beta at several scales",
    targets="best accuracy <= 20% (the fake-passport target)",
    knowledge="A1 pirate who read the paper: public.onnx and labelled test images; draws gamma ~ N(0, s), "
              "beta ~ N(0, s/2) per layer at scales s in {0.3, 1, 3}. The checkpoint-level fake passports "
              "(Avg(W * P) of random P) are in `sealnet passport-eval`.")
def passport_random_params(target: Target, budget: Budget, out: Path) -> Outcome:
    rng = np.random.default_rng(target.seed)
    shapes = _param_shapes(target)
    x, y = target.data.x_test[:500], target.data.y_test[:500]
    accs = []
    for i in progress(range(budget.input_only_trials), desc="random gamma/beta", unit="trial"):
        scale = (0.3, 1.0, 3.0)[i % 3]
        params = {n: (rng.normal(0, scale if n.startswith("gamma") else scale / 2, s)).astype(np.float32)
                  for n, s in shapes.items()}
        accs.append(target.accuracy_with_params(params, x, y))
    histogram(out / "passport_random_params.png", accs, title=f"Random gamma/beta ({len(accs)} draws)",
              xlabel="accuracy of public.onnx with random gamma/beta", marks={"target 20%": FAKE_MAX})
    return Outcome([Metric("mean_acc", float(np.mean(accs))),
                    Metric("best_acc", float(np.max(accs)), "<=", FAKE_MAX, note=f"{len(accs)} draws, 500 images")],
                   details={"accuracies": accs}, plots=["passport_random_params.png"])


@register_attack(
    "passport-insider-params", suite="model", methods=("passport",),
    title="Insider: gamma/beta read off the protocol, then no trusted module needed",
    targets="accuracy without the module afterwards <= 15%",
    knowledge="A2 insider on the edge host with one valid license: calls PassportParams once (as the runtime "
              "does), keeps the answer, and runs public.onnx with it from then on.")
def passport_insider_params(target: Target, budget: Budget, out: Path) -> Outcome:
    stolen = target.passport_params()
    acc = target.accuracy_with_params(stolen)
    return Outcome([Metric("stolen_params_acc", acc, "<=", DIRECT_PIRACY_MAX,
                           note="gamma/beta do not depend on the input: one call gives a working model")],
                   notes=["Expected to FAIL: scheme V1 deployed with the runtime on the edge host hands gamma/beta "
                          "to that host; see docs/passport.md, 'What an insider on the edge host (A2) sees'."])
