"""Is a copy worth more than black-box access? The stealing protocol of TEESlice (IEEE S&P 2024), for every method.

- Thief (A1 with some labelled data): the bundle's public files plus p% of the labelled training images. Best of
  fine-tuning the public network end to end with a new head (and as it is, where it outputs classes), the frozen
  public network with a new head, and training the same architecture from scratch.
- Black-box attacker: the same images, labelled by querying the deployed endpoint, plus whatever is public anyway
  (for a sealed head: the published backbone, frozen, with a new head). Best of that and training from scratch.
- Judged: stolen / black-box accuracy <= 1.05 at 1% and 10% (0.1% is reported).
For a sealed head, the insider (A2) attack imitates the head from N trusted-module queries with feature vectors of
its choice against a head distilled from N endpoint queries; judged the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sealnet.attacks.base import Budget, Metric, Outcome, Skip, Target, pct, progress, torch_threads
from sealnet.attacks.plots import grouped_bars
from sealnet.attacks.registry import register_attack
from sealnet.attacks.stealing import fit_steps, torch_accuracy
from sealnet.bundle import CLASSIFY
from sealnet.outputs import predicted_labels
from sealnet.protect.onnx_torch import OnnxModule, penultimate

RATIO_LIMIT = 1.05
JUDGED_FRACTIONS = (0.01, 0.1)
HEAD_HIDDEN = 256
QUERY_BATCH = 250


class _Stacked(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).flatten(1))


def new_head(width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, num_classes))


@torch.no_grad()
def _features(module: nn.Module, x: np.ndarray) -> np.ndarray:
    module.eval()
    return np.concatenate([module(torch.from_numpy(x[i : i + 500])).flatten(1).numpy() for i in range(0, len(x), 500)])


FROZEN, TUNED, AS_IS, SCRATCH = ("frozen public + new head", "fine-tuned public + new head",
                                 "fine-tuned public as is", "scratch")
THIEF = (FROZEN, TUNED, AS_IS, SCRATCH)


def copy_accuracies(target: Target, x: np.ndarray, y: np.ndarray, *, steps: int, seed: int,
                    strategies: tuple[str, ...] = THIEF) -> dict[str, float]:
    """Test accuracy of each way to build a copy from (x, y): from public.onnx frozen with a new head, fine-tuned
    with a new head, fine-tuned as it is (where it outputs class scores), or the same architecture from scratch."""
    data, model = target.data, target.public_model
    cut, width = penultimate(model)
    classes = data.num_classes
    accs: dict[str, float] = {}
    with torch_threads(1):
        if FROZEN in strategies:
            trunk = OnnxModule(model, output=cut)
            head = fit_steps(new_head(width, classes), _features(trunk, x), y, F.cross_entropy, steps=steps,
                             seed=seed, lr=1e-3)
            accs[FROZEN] = torch_accuracy(head, _features(trunk, data.x_test), data.y_test)
        if TUNED in strategies:
            torch.manual_seed(seed)
            tuned = fit_steps(_Stacked(OnnxModule(model, output=cut), new_head(width, classes)), x, y,
                              F.cross_entropy, steps=steps, seed=seed, lr=1e-3)
            accs[TUNED] = torch_accuracy(tuned, data.x_test, data.y_test)
        if AS_IS in strategies and cut != model.graph.output[0].name:  # the public network outputs class scores
            as_is = fit_steps(OnnxModule(model), x, y, F.cross_entropy, steps=steps, seed=seed, lr=1e-3)
            accs[AS_IS] = torch_accuracy(as_is, data.x_test, data.y_test)
        if SCRATCH in strategies:
            torch.manual_seed(seed)
            scratch = fit_steps(_Stacked(OnnxModule(model, output=cut).reinitialize(seed), nn.Linear(width, classes)),
                                x, y, F.cross_entropy, steps=steps, seed=seed, lr=1e-3)
            accs[SCRATCH] = torch_accuracy(scratch, data.x_test, data.y_test)
    return accs


def endpoint_labels(target: Target, x: np.ndarray) -> np.ndarray:
    """What a black-box user learns: the deployed endpoint's predicted class for each image."""
    if not (target.endpoint and target.license):
        raise Skip("needs the endpoint (--endpoint) and a valid license (--license-file) for black-box labels")
    return predicted_labels(_endpoint_answers(target, x))


def _endpoint_answers(target: Target, x: np.ndarray) -> dict[str, np.ndarray]:
    from sealnet.runtime.client import InferenceClient

    client = InferenceClient(target.endpoint, target.bundle.model_id, timeout=120.0)
    try:
        return _in_chunks(lambda part: client.infer_outputs(part, target.license), x)
    finally:
        client.close()


def _in_chunks(call, x: np.ndarray) -> dict[str, np.ndarray]:
    """`call` (one query) over x in QUERY_BATCH slices, its named outputs concatenated."""
    parts = [call(x[i : i + QUERY_BATCH]) for i in range(0, len(x), QUERY_BATCH)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@register_attack(
    "teeslice-stealing", suite="model", title="Stealing vs black-box (TEESlice protocol)",
    targets="best stolen accuracy / best black-box accuracy <= 1.05 at 1% and 10% of the training data",
    knowledge="A1 thief: the bundle's public files and p% of the labelled training images (0.1%, 1%, 10%). "
              "Compared with a black-box attacker who has the same images, labels from the deployed endpoint "
              "and whatever is public anyway (a sealed head's published backbone).")
def teeslice_stealing(target: Target, budget: Budget, out: Path) -> Outcome:
    data = target.data
    public_anyway = target.step == CLASSIFY  # the backbone is published
    rng = np.random.default_rng(target.seed)
    order = rng.permutation(len(data.x_train))
    fractions = sorted({0.001, *budget.steal_fractions})
    blackbox_y = endpoint_labels(target, data.x_train[order[: max(data.num_classes,
                                                                   round(max(fractions) * len(order)))]])
    metrics, rows = [], []
    thief_best, box_best, groups = [], [], []
    for frac in progress(fractions, desc="stealing vs black-box (fraction)", unit="fraction"):
        n = max(data.num_classes, round(frac * len(order)))
        idx = order[:n]
        x = data.x_train[idx]
        thief = copy_accuracies(target, x, data.y_train[idx], steps=budget.steal_steps, seed=target.seed)
        box = copy_accuracies(target, x, blackbox_y[:n], steps=budget.steal_steps, seed=target.seed,
                              strategies=(FROZEN, TUNED, SCRATCH) if public_anyway else (SCRATCH,))
        t, b = max(thief.values()), max(box.values())
        ratio = t / max(b, 1e-9)
        label = f"{frac:.1%}".replace(".0%", "%")
        judged = any(abs(frac - j) < 1e-9 for j in JUDGED_FRACTIONS)
        metrics.append(Metric(f"steal_ratio@{label}", ratio, "<=" if judged else None,
                              RATIO_LIMIT if judged else None, unit="rate",
                              note=f"stolen {pct(t)} ({max(thief, key=thief.get)}) / black-box {pct(b)} "
                                   f"({max(box, key=box.get)})"))
        rows.append({"fraction": frac, "images": n, "thief": thief, "blackbox": box, "thief_best": t,
                     "blackbox_best": b, "ratio": ratio})
        groups.append(f"{label} ({n} images)")
        thief_best.append(t)
        box_best.append(b)
    grouped_bars(out / "teeslice_stealing.png", groups, {"thief (public files + labels)": thief_best,
                                                         "black-box (endpoint labels)": box_best},
                 title=f"Stealing vs black-box: {target.method}", ylabel="test accuracy of the copy", lines={})
    return Outcome(metrics, details={"steps": budget.steal_steps, "public_anyway": public_anyway, "rows": rows},
                   plots=["teeslice_stealing.png"])


def _answer_targets(answer: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """(hard labels, soft logits or None) from a module or endpoint answer under any output policy."""
    return predicted_labels(answer), answer.get("logits")


def _fit_head(features: np.ndarray, labels: np.ndarray, soft: np.ndarray | None, num_classes: int, *,
              steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    head = new_head(features.shape[1], num_classes)
    if soft is None:
        return fit_steps(head, features, labels, F.cross_entropy, steps=steps, seed=seed, lr=1e-3, batch_size=128)
    return fit_steps(head, features, soft.astype(np.float32), F.mse_loss, steps=steps, seed=seed, lr=1e-3,
                     batch_size=128)


def _module_answers(target: Target, features: np.ndarray) -> dict[str, np.ndarray]:
    from sealnet.runtime.enclave_client import EnclaveClient

    client = EnclaveClient(target.enclave, tls_dir=target.enclave_tls, timeout=120.0)
    try:
        return _in_chunks(lambda part: client.classify(target.license, part, target.bundle.manifest["outputs"],
                                                       client=f"attack-insider-{target.seed}"), features)
    finally:
        client.close()


@register_attack(
    "insider-imitation", suite="model", methods=("sealed-head",), title="Insider imitates the sealed head",
    targets="insider copy / black-box copy <= 1.05 (N queries each, N = the training set size)",
    knowledge="A2 insider on the edge host: the published backbone, N unlabelled images, and N trusted-module "
              "Classify queries with feature vectors of its choice (natural features, or half natural and half "
              "mixtures of two, probing between classes). Compared with a head distilled from N endpoint queries "
              "on the same images.")
def insider_imitation(target: Target, budget: Budget, out: Path) -> Outcome:
    if not (target.enclave and target.endpoint and target.license):
        raise Skip("needs the trusted module (--enclave), the endpoint (--endpoint) and a valid license")
    data = target.data
    session, name = target.public_session, target.bundle.manifest["input"]["name"]

    def features(x: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)])

    pool, test = features(data.x_train), features(data.x_test)
    n = len(pool)
    rng = np.random.default_rng(target.seed)
    half = n // 2
    a, b = rng.integers(0, n, half), rng.integers(0, n, half)
    lam = rng.random((half,) + (1,) * (pool.ndim - 1), dtype=np.float32)  # one mixing weight per probe
    probes = {"natural": pool,
              "natural + mixtures": np.concatenate([pool[rng.permutation(n)[: n - half]],
                                                    lam * pool[a] + (1 - lam) * pool[b]]).astype(np.float32)}
    steps = max(budget.steal_steps * 4, 600)
    insider = {}
    flat_test = test.reshape(len(test), -1)  # copies are MLPs over flat features, whatever their shape
    for label, queries in progress(probes.items(), desc="insider imitation (query plan)", unit="plan"):
        hard, soft = _answer_targets(_module_answers(target, queries))
        with torch_threads(1):
            head = _fit_head(queries.reshape(len(queries), -1), hard, soft, data.num_classes, steps=steps,
                             seed=target.seed)
            insider[label] = torch_accuracy(head, flat_test, data.y_test)
    hard, soft = _answer_targets(_endpoint_answers(target, data.x_train))
    with torch_threads(1):
        box = torch_accuracy(_fit_head(pool.reshape(n, -1), hard, soft, data.num_classes, steps=steps,
                                       seed=target.seed), flat_test, data.y_test)
    best = max(insider, key=insider.get)
    ratio = insider[best] / max(box, 1e-9)
    policy = target.bundle.manifest.get("output_policy", "label")
    metrics = [Metric("insider_ratio", ratio, "<=", RATIO_LIMIT, unit="rate",
                      note=f"insider {pct(insider[best])} ({best}) / black-box {pct(box)}; policy {policy}; N={n}"),
               *(Metric(f"insider_acc[{k}]", v) for k, v in insider.items()), Metric("blackbox_distilled_acc", box)]
    return Outcome(metrics, details={"queries": n, "policy": policy, "steps": steps, "insider": insider,
                                     "blackbox": box})
