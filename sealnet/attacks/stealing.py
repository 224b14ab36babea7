"""Model stealing by fine-tuning (TEESlice style): is the public network worth more than a fresh one?

The pirate turns public.onnx back into a trainable network and fine-tunes it on a few labelled raw images;
the control trains the same architecture from scratch on the same images with the same schedule. If the
public weights carry the model's value, the stolen copy beats the control by far; the target is that it does
not (stolen <= scratch + 2 pts, the docs/security.md target).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from sealnet.attacks.base import Budget, Metric, Outcome, Target, pct, progress, torch_threads
from sealnet.attacks.plots import grouped_bars
from sealnet.attacks.registry import register_attack
from sealnet.bundle import PUBLIC_ONNX
from sealnet.protect.models import create_model

STEAL_MARGIN = 0.02


def public_torch_model(onnx_path: Path, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Rebuild `simple_cnn` from public.onnx's initializers (sizes read from the weights) and check that it
    computes what the ONNX graph computes; other architectures are refused with a clear error."""
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in onnx.load(str(onnx_path)).graph.initializer}
    try:
        width, hidden = weights["features.0.weight"].shape[0], weights["classifier.1.weight"].shape[0]
    except KeyError:
        raise ValueError(f"{onnx_path.name}: not the simple_cnn architecture (initializers: "
                         f"{', '.join(sorted(weights)[:6])}...); model stealing supports simple_cnn only") from None
    model = create_model("simple_cnn", input_shape, num_classes, width=width, hidden=hidden)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def fit_steps(model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn, *, steps: int, seed: int, lr: float,
              batch_size: int = 64) -> nn.Module:
    """Adam on `loss_fn(model(x), y)` for a fixed number of seeded minibatch steps; returns the model in eval."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (min(batch_size, len(xt)),), generator=gen)
        loss = loss_fn(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_steps(model: nn.Module, x: np.ndarray, y: np.ndarray, *, steps: int, seed: int,
                lr: float = 1e-3, batch_size: int = 64) -> nn.Module:
    """Cross-entropy training with the same schedule for the stolen and the scratch network."""
    return fit_steps(model, x, y, F.cross_entropy, steps=steps, seed=seed, lr=lr, batch_size=batch_size)


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    preds = np.concatenate([model(torch.from_numpy(x[i : i + 500])).argmax(1).numpy() for i in range(0, len(x), 500)])
    return float((preds == y).mean())


@register_attack(
    "model-stealing", suite="model", methods=("transform", "dsn"), title="Model stealing: fine-tune the public network",
    targets="fine-tuned accuracy <= scratch + 2 pts, per data fraction",
    knowledge="A1 pirate with some labelled data: public.onnx (weights turned back into a trainable network) and "
              "1% / 10% (50% at full budget) of the training images with labels, raw (no trusted module). "
              "Control: the same architecture trained from scratch on the same images with the same schedule.")
def model_stealing(target: Target, budget: Budget, out: Path) -> Outcome:
    data = target.data
    onnx_path = target.bundle.path(PUBLIC_ONNX)
    public = public_torch_model(onnx_path, data.input_shape, data.num_classes)
    check = data.x_test[:64]
    feed = {target.bundle.manifest["input"]["name"]: check}
    with torch.no_grad():
        diff = float(np.abs(public(torch.from_numpy(check)).numpy() - target.public_session.run(None, feed)[0]).max())
    if diff > 1e-3:
        raise ValueError(f"rebuilt network differs from public.onnx by {diff:.1e}; cannot fine-tune it faithfully")
    rng = np.random.default_rng(target.seed)
    metrics, groups, stolen_accs, scratch_accs, rows = [], [], [], [], []
    for frac in progress(budget.steal_fractions, desc="model stealing (fraction)", unit="fraction"):
        n = max(data.num_classes, round(frac * len(data.x_train)))
        idx = rng.permutation(len(data.x_train))[:n]
        x, y = data.x_train[idx], data.y_train[idx]
        with torch_threads(1):
            stolen = public_torch_model(onnx_path, data.input_shape, data.num_classes)
            train_steps(stolen, x, y, steps=budget.steal_steps, seed=target.seed)
            torch.manual_seed(target.seed)
            scratch = create_model("simple_cnn", data.input_shape, data.num_classes,
                                   width=stolen.features[0].out_channels, hidden=stolen.classifier[1].out_features)
            train_steps(scratch, x, y, steps=budget.steal_steps, seed=target.seed)
            s_acc = torch_accuracy(stolen, data.x_test, data.y_test)
            c_acc = torch_accuracy(scratch, data.x_test, data.y_test)
        label = f"{frac:.0%}"
        groups.append(f"{label} ({n} images)")
        stolen_accs.append(s_acc)
        scratch_accs.append(c_acc)
        rows.append({"fraction": frac, "images": n, "stolen_acc": s_acc, "scratch_acc": c_acc})
        metrics.append(Metric(f"stolen_acc@{label}", s_acc, "<=", c_acc + STEAL_MARGIN,
                              note=f"scratch {pct(c_acc)} + 2 pts (target)"))
        metrics.append(Metric(f"scratch_acc@{label}", c_acc))
    grouped_bars(out / "model_stealing.png", groups, {"fine-tuned public net": stolen_accs,
                                                      "from scratch": scratch_accs},
                 title="Model stealing by fine-tuning", ylabel="test accuracy on raw inputs",
                 lines={"public net before fine-tuning": torch_accuracy(public, data.x_test, data.y_test)})
    return Outcome(metrics, details={"steps": budget.steal_steps, "rows": rows, "rebuild_max_abs_diff": diff},
                   plots=["model_stealing.png"])
