"""Ownership verification with passports, and the attacks of the passport papers as one evaluation.

Verification (Definition 1 of the extended paper): the signature decoded from sign(gamma), gamma computed from
the claimed passport and the model's public weights, must match the claimed string bit for bit, and the
accuracy with that passport must be within eps_f of the recorded one (fidelity). Scheme V3 adds black-box
trigger-set detection through the deployed network. The functions take a model and/or prediction callables,
so the same checks run on a bundle or a gRPC endpoint (wrap it as `predict(x) -> labels or logits`).

`sealnet passport-eval` measures (JSON + Markdown + PNG):
- valid passport vs the plain baseline;
- fake1: N random passports (same generator as the owner's type), max / mean / p90 accuracy;
- svd: a data-free white-box attack: gamma_l = +-(top left singular vector of the passport map of layer l),
  beta = 0, best sign combination (shows whether the public weights leak gamma's direction);
- fake2: reverse engineering with the training data: all weights frozen, gamma/beta (or a new passport)
  trained on the training set, started from a random passport; accuracy and signature bits that survive;
- fake3: insider who knows passport and signature, forges a signature with x% of signs flipped;
- V2/V3 forgery: a passport solved by least squares so that Avg(W * P) equals the *public* gamma/beta;
- cerb: the ambiguity attack of Chen et al. (CVPR 2023) with 2% and 10% of the training data: accessory FC blocks
  trained on a fake passport's gamma/beta (weights frozen, sign loss towards the attacker's signature), a
  passport solved for the result and checked with `verify_ownership`; with the vectors trained directly, without
  the sign loss (fake2 on the same data) and keeping the owner's signs, for comparison;
- pruning 10-90% (class-blind, global magnitude) and fine-tuning to another task: accuracy and signature.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sealnet.data import Dataset
from sealnet.protect.checkpoint import ProtectedCheckpoint, load_checkpoint
from sealnet.protect.passport import (
    PASSPORT_BRANCH,
    Params,
    bits_to_signature,
    compute_params,
    extract_bits,
    image_passports,
    passport_branch,
    passport_layers,
    random_passports,
    sign_loss,
    signature_to_bits,
    use_params,
    use_passports,
)
from sealnet.protect.passport_train import (
    _stem_in_body,
    branch_accuracy,
    load_passport_file,
    passport_model,
)

Predict = Callable[[np.ndarray], np.ndarray]


def _labels(out: np.ndarray | torch.Tensor) -> np.ndarray:
    out = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out)
    return out.argmax(1) if out.ndim == 2 else out.reshape(-1)


def callable_accuracy(predict: Predict, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Accuracy of any `predict(x) -> labels or logits` (a torch model, an ONNX session, a gRPC client)."""
    preds = np.concatenate([_labels(predict(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
    return float((preds == y).mean())


def model_predict(model: nn.Module, branch: str = "passport") -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad(), passport_branch(model, branch == PASSPORT_BRANCH):
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return predict


# -- verification -----------------------------------------------------------------------------------------------
@dataclass
class VerificationResult:
    verified: bool
    signature_claimed: str
    signature_decoded: str
    signature_match: bool
    signature_bits_matched: int
    signature_bits: int
    accuracy: float | None = None
    recorded_acc: float | None = None
    eps_f: float = 0.03
    fidelity_ok: bool | None = None
    channel_bits_matched: int | None = None  # all designated channel signs vs the recorded bits, when known
    capacity_bits: int | None = None
    trigger_acc: float | None = None
    trigger_threshold: float = 0.95
    trigger_ok: bool | None = None
    passport_in_range: bool | None = None  # checked when verify_ownership gets passport_bound
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _signature_check(bits: np.ndarray, signature: str, recorded_acc: float | None, eps_f: float) -> VerificationResult:
    """A result with the signature part filled in: sign(gamma) bits against the claimed string, bit for bit."""
    claimed = signature_to_bits(signature, len(bits))
    n = len(claimed)
    matched = int((bits[:n] == claimed).sum())
    res = VerificationResult(verified=False, signature_claimed=signature, signature_decoded=bits_to_signature(bits[:n]),
                             signature_match=matched == n, signature_bits_matched=matched, signature_bits=n,
                             eps_f=eps_f, recorded_acc=recorded_acc)
    if not res.signature_match:
        res.reasons.append(f"signature mismatch: {n - matched} of {n} bits differ (decoded "
                           f"{res.signature_decoded!r})")
    return res


def _fidelity_check(res: VerificationResult, accuracy: float) -> None:
    """Record the accuracy with the claimed passport and whether it is within eps_f of the recorded one."""
    res.accuracy = accuracy
    if res.recorded_acc is not None:
        res.fidelity_ok = abs(accuracy - res.recorded_acc) <= res.eps_f
        if not res.fidelity_ok:
            res.reasons.append(f"fidelity: accuracy {accuracy:.2%} with this passport is not within "
                               f"{res.eps_f:.0%} of the recorded {res.recorded_acc:.2%}")


def _range_check(res: VerificationResult, passports: Iterable[Any], bound: float) -> None:
    """Every element of the claimed passports within [-bound, bound] (the owner's T1 range; not in the papers)."""
    worst = max(float(np.abs(np.asarray(p)).max()) for p in passports)
    res.passport_in_range = worst <= bound * (1 + 1e-6)
    if not res.passport_in_range:
        res.reasons.append(f"passport out of range: max |P| = {worst:.3g} > {bound:g}")


def verify_ownership(model: nn.Module, passports: dict[str, dict[str, torch.Tensor]], signature: str,
                     x: np.ndarray | None = None, y: np.ndarray | None = None, recorded_acc: float | None = None,
                     eps_f: float = 0.03, predict: Predict | None = None,
                     trigger: tuple[np.ndarray, np.ndarray] | None = None, trigger_predict: Predict | None = None,
                     trigger_threshold: float = 0.95, recorded_bits: np.ndarray | None = None,
                     passport_bound: float | None = None) -> VerificationResult:
    """White-box passport verification (+ black-box trigger check for V3).

    model: the suspect network's public weights as a passport net; passports: the claimant's passports.
    predict: inference *with the claimed passport* (default: `model` with `passports` installed);
    trigger_predict: the deployed network as a black box (default: the model's public branch when it has one).
    passport_bound (not in the papers): every passport element must lie in [-bound, bound], the range random
    (T1) passports are drawn from; a passport solved for forged gamma/beta (CERB) usually does not.
    """
    bits = extract_bits(model, passports)
    res = _signature_check(bits, signature, recorded_acc, eps_f)
    res.trigger_threshold = trigger_threshold
    if passport_bound is not None:
        _range_check(res, (p for pp in passports.values() for p in pp.values()), passport_bound)
    if recorded_bits is not None:
        rb = np.asarray(recorded_bits).reshape(-1)
        res.channel_bits_matched = int((rb == bits[: len(rb)]).sum())
        res.capacity_bits = len(bits)
    if x is not None and y is not None:
        if predict is None:
            with use_passports(model, passports):
                _fidelity_check(res, callable_accuracy(model_predict(model, "passport"), x, y))
        else:
            _fidelity_check(res, callable_accuracy(predict, x, y))
    elif recorded_acc is not None:
        res.reasons.append("fidelity not checked: no test data")
    if trigger is not None:
        if trigger_predict is None:
            has_public = any(layer.public_affine for layer in passport_layers(model).values())
            trigger_predict = model_predict(model, "public" if has_public else "passport")
        res.trigger_acc = callable_accuracy(trigger_predict, trigger[0], trigger[1])
        res.trigger_ok = res.trigger_acc >= trigger_threshold
        if not res.trigger_ok:
            res.reasons.append(f"trigger set: {res.trigger_acc:.2%} detected < {trigger_threshold:.0%}")
    res.verified = bool(res.signature_match and res.fidelity_ok is not False and res.trigger_ok is not False
                        and (res.fidelity_ok is not None or recorded_acc is None)
                        and res.passport_in_range is not False)
    return res


def verify_checkpoint(checkpoint: Path, passport_file: Path, signature: str, data: Dataset,
                      eps_f: float | None = None, trigger_threshold: float = 0.95,
                      trigger_predict: Predict | None = None) -> VerificationResult:
    """`sealnet verify`: the checkpoint's public weights + the owner's passport file + the claimed signature;
    V3: the trigger set through `trigger_predict` (a suspect's endpoint), else the checkpoint's public branch."""
    ckpt = load_checkpoint(checkpoint)
    secret = load_passport_file(passport_file)
    model = passport_model(ckpt, secret)
    # The fidelity reference and tolerance come from the checkpoint (the owner's record), not from the claimant's
    # passport file: a forger (CERB) would write their own accuracy there.
    recorded = ckpt.metrics.get("valid_acc", secret.get("valid_acc"))
    if eps_f is None:
        eps_f = ckpt.secret.get("eps_f", 0.03) if ckpt.secret else 0.03
    bound = None  # a claimed random (T1) passport must lie in the range the owner's record says it was drawn from
    if ckpt.secret and ckpt.secret.get("passport_type") == "random":
        bound = float(ckpt.secret.get("passport_scale", 1.0))
    trigger = None
    if secret.get("trigger_x") is not None:
        trigger = (secret["trigger_x"].numpy(), secret["trigger_y"].numpy())
    return verify_ownership(model, secret["passports"], signature, data.x_test, data.y_test, recorded,
                            eps_f=eps_f, trigger=trigger,
                            trigger_predict=trigger_predict, trigger_threshold=trigger_threshold,
                            recorded_bits=secret["bits"].numpy(), passport_bound=bound)


def verify_bundle(bundle_dir: Path, passport_file: Path, signature: str, data: Dataset,
                  eps_f: float | None = None) -> VerificationResult:
    """`sealnet verify --bundle`: the passport check against a deployed V1 bundle's public.onnx alone.

    gamma/beta come from the claimed passport and the weights public.onnx carries under their parameter names
    (the same computation as the trusted module's); sign(gamma) must decode to the signature and public.onnx
    run with those gamma/beta must reach the accuracy recorded in the owner-signed manifest at export
    (checks.authorized_acc) within eps_f (default 3%). Neither comes from the claimant's passport file: a forger
    who solved a passport for trained gamma/beta (CERB) would record their own accuracy there."""
    import onnx
    from onnx import helper, numpy_helper

    from sealnet.bundle import PUBLIC_ONNX, load_bundle
    from sealnet.enclave_sim.secrets.passport import derive_params
    from sealnet.onnx_session import session_from_model, with_params

    bundle = load_bundle(bundle_dir)
    bundle.require_method("passport")
    secret = load_passport_file(passport_file)
    if secret["passport_fn"] != "both":
        raise ValueError(f"verify --bundle needs passport function 'both' (this passport file: "
                         f"{secret['passport_fn']!r}); use --checkpoint")
    model = onnx.load(str(bundle.path(PUBLIC_ONNX)))
    weights = {i.name: i for i in model.graph.initializer}
    convs = {n.input[1]: n for n in model.graph.node if n.op_type == "Conv"}
    specs, arrays = [], {}
    for i, (layer, passports) in enumerate(secret["passports"].items()):
        name = f"model.{layer}.conv.weight"
        if name not in weights or name not in convs:
            raise ValueError(f"{bundle_dir}/{PUBLIC_ONNX} has no convolution weight {name!r} for passport layer "
                             f"{layer!r} (wrong passport file, or a bundle exported with folded weights)")
        attrs = {a.name: helper.get_attribute_value(a) for a in convs[name].attribute}
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        specs.append({"layer": layer, "gamma": f"gamma_{i}", "beta": f"beta_{i}", "kind": "conv",
                      "stride": list(attrs.get("strides", [1, 1])), "padding": pads[:2],
                      "gamma_from": "passport", "beta_from": "passport"})
        arrays[f"{layer}/weight"] = numpy_helper.to_array(weights[name])
        arrays[f"{layer}/gamma"] = passports["gamma"].numpy()
        arrays[f"{layer}/beta"] = passports["beta"].numpy()
    params = derive_params({"layers": specs}, arrays)
    bits = np.concatenate([np.where(params[f"gamma_{i}"] >= 0, 1, -1) for i in range(len(specs))]).astype(np.int8)
    recorded = bundle.manifest.get("checks", {}).get("authorized_acc")
    if recorded is None:
        raise ValueError(f"{bundle_dir}: the manifest records no authorized accuracy to check fidelity against")
    res = _signature_check(bits, signature, float(recorded), 0.03 if eps_f is None else eps_f)
    if bundle.manifest.get("passport_type") == "random":  # the owner-signed range of a genuine T1 passport
        _range_check(res, (arrays[f"{s['layer']}/{k}"] for s in specs for k in ("gamma", "beta")),
                     float(bundle.manifest.get("passport_scale", 1.0)))
    session = session_from_model(with_params(model, params))
    name_in = session.get_inputs()[0].name
    _fidelity_check(res, callable_accuracy(lambda x: session.run(None, {name_in: x})[0], data.x_test, data.y_test))
    res.verified = bool(res.signature_match and res.fidelity_ok and res.passport_in_range is not False)
    return res


# -- fast evaluation with explicit gamma/beta ------------------------------------------------------------------------
class Evaluator:
    """Accuracy of the passport branch under many (gamma, beta) settings, with the stem's output cached."""

    def __init__(self, model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500):
        self.model = model.eval()
        self.y = y
        self.split = _stem_in_body(model)
        xs = torch.from_numpy(x)
        with torch.no_grad():
            self.h = [model.stem(xs[i : i + batch_size]) if self.split else xs[i : i + batch_size]
                      for i in range(0, len(xs), batch_size)]

    @torch.no_grad()
    def accuracy(self, params: Params | None = None) -> float:
        self.model.eval()
        run = self.model.body if self.split else self.model
        with passport_branch(self.model, True):
            if params is None:
                preds = [run(h).argmax(1) for h in self.h]
            else:
                with use_params(self.model, params):
                    preds = [run(h).argmax(1) for h in self.h]
        return float((torch.cat(preds).numpy() == self.y).mean())


def fake_accuracies(model: nn.Module, ev: Evaluator, n: int, seed: int, kind: str = "random",
                    images: np.ndarray | None = None, scale: float = 1.0, progress: bool = True) -> np.ndarray:
    """fake1: accuracies with n fake passports of a type (random U[-1,1], or other images' feature maps)."""
    gen = torch.Generator().manual_seed(seed)
    accs = []
    for _ in tqdm(range(n), desc=f"fake passports ({kind})", disable=not progress, unit="passport"):
        if kind == "random":
            fake = random_passports(model, gen, scale)
        else:
            pick = torch.randperm(len(images), generator=gen)[:20].numpy()
            fake = image_passports(model, torch.from_numpy(images[pick]), gen, shuffle=kind == "shuffled")
        with torch.no_grad():
            accs.append(ev.accuracy(compute_params(model, fake)))
    return np.asarray(accs)


def passport_jacobian(layer: nn.Module) -> torch.Tensor:
    """The exact linear map P -> Avg(W * P) of one layer as a (C_out, prod(passport_shape)) matrix."""
    zero = torch.zeros(layer.passport_shape)
    with torch.no_grad():
        jac = torch.func.jacrev(layer.avg_response)(zero)
    return jac.reshape(layer.out_channels, -1)


def svd_attack(model: nn.Module, ev: Evaluator, max_combos: int = 64) -> dict[str, Any]:
    """Data-free white-box attack: gamma_l = +-u1(M_l) (top left singular vector), beta_l = 0; best sign combo.

    Also reports |cos(u1, gamma_true)| per layer: how much of gamma's direction the public weights reveal.
    """
    true = compute_params(model)
    dirs, leak = {}, {}
    for name, layer in passport_layers(model).items():
        u = torch.linalg.svd(passport_jacobian(layer), full_matrices=False)[0][:, 0]
        dirs[name] = u
        g = true[name][0].detach()
        leak[name] = float(abs(u @ g) / (g.norm() + 1e-12))
    names = list(dirs)
    best, accs = 0.0, []
    combos = min(2 ** len(names), max_combos)
    for c in range(combos):
        params = {name: ((1.0 if (c >> i) & 1 == 0 else -1.0) * dirs[name] * np.sqrt(len(dirs[name])),
                         torch.zeros_like(dirs[name])) for i, name in enumerate(names)}
        accs.append(ev.accuracy(params))
        best = max(best, accs[-1])
    return {"svd_attack_acc": best, "svd_attack_accs": accs, "gamma_leak_cos": leak}


# What the reverse-engineering attack trains: the layers' gamma/beta directly, or a passport that yields them.
REV_PARAMS, REV_PASSPORT = "params", "passport"
REV_TARGETS = (REV_PARAMS, REV_PASSPORT)


def _rev_params(model: nn.Module, init: dict[str, dict[str, torch.Tensor]], target: str
                ) -> tuple[list[nn.Parameter], Callable[[], Params]]:
    layers = passport_layers(model)
    if target == REV_PASSPORT:
        ps = {n: (nn.Parameter(init[n]["gamma"].clone()), nn.Parameter(init[n]["beta"].clone())) for n in layers}
        return ([p for pair in ps.values() for p in pair],
                lambda: {n: layers[n].passport_params(ps[n][0], ps[n][1]) for n in layers})
    start = compute_params(model, init)
    ps = {n: (nn.Parameter(g.detach().clone()), nn.Parameter(b.detach().clone())) for n, (g, b) in start.items()}
    return [p for pair in ps.values() for p in pair], lambda: {n: (g, b) for n, (g, b) in ps.items()}


def svd_init_params(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Params:
    """A data-aided start for reverse engineering: gamma_l = +-u1(M_l) * sqrt(C_l), beta = 0, the sign combination
    that scores best on (x, y) (the attacker's own labelled data)."""
    layers = passport_layers(model)
    dirs = {n: torch.linalg.svd(passport_jacobian(layer), full_matrices=False)[0][:, 0] for n, layer in layers.items()}
    ev = Evaluator(model, x.numpy(), y.numpy())
    best, best_params = -1.0, None
    for c in range(min(2 ** len(dirs), 64)):
        params = {n: ((1.0 if (c >> i) & 1 == 0 else -1.0) * d * np.sqrt(len(d)), torch.zeros_like(d))
                  for i, (n, d) in enumerate(dirs.items())}
        acc = ev.accuracy(params)
        if acc > best:
            best, best_params = acc, params
    return best_params


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Every weight of the owner's network fixed while an attack trains only what it forges (gamma/beta, a
    passport, accessory blocks); trainable again afterwards, also when the attack fails."""
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def reverse_engineer(model: nn.Module, data: Dataset, ev: Evaluator, bits: np.ndarray, signature_nbits: int,
                     epochs: int = 3, lr: float = 0.01, seed: int = 0, target: str = REV_PARAMS, init: str = "random",
                     scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """fake2 (ambiguity attack of the extended paper): freeze every weight, train only gamma/beta (`target`
    'params') or a new passport ('passport') on the training data.

    init 'random': start from a random passport (the paper); 'svd' (ours, stronger, params only): start from the
    top singular directions of the public passport maps (see `svd_attack`), signs picked on training data.
    """
    gen = torch.Generator().manual_seed(seed + 77)
    model.eval()  # BatchNorm keeps the owner's running statistics; the attacker trains the affine only
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    if init == "svd":
        if target != "params":
            raise ValueError("init 'svd' reverse-engineers gamma/beta (target 'params')")
        start = svd_init_params(model, x[:1000], y[:1000])
        ps = {n: (nn.Parameter(g.clone()), nn.Parameter(b.clone())) for n, (g, b) in start.items()}
        params, current = [p for pair in ps.values() for p in pair], (lambda: dict(ps))
    elif init == "random":
        params, current = _rev_params(model, random_passports(model, gen, scale), target)
    else:
        raise ValueError(f"unknown init {init!r}; choose random or svd")
    opt = torch.optim.Adam(params, lr=lr)
    split = _stem_in_body(model)
    with torch.no_grad():
        hs = torch.cat([model.stem(x[i : i + 500]) if split else x[i : i + 500] for i in range(0, len(x), 500)])
    run = model.body if split else model
    with frozen_weights(model):
        with passport_branch(model, True):
            for ep in range(epochs):
                for idx in tqdm(torch.randperm(len(x), generator=gen).split(128), disable=not progress,
                                desc=f"reverse-engineer ({target}, {init} init) epoch {ep + 1}/{epochs}",
                                unit="batch"):
                    with use_params(model, current()):
                        loss = F.cross_entropy(run(hs[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            final = {n: (g.detach(), b.detach()) for n, (g, b) in current().items()}
    got = np.where(torch.cat([g.reshape(-1) for g, _ in final.values()]).numpy() >= 0, 1, -1)
    return {"acc": ev.accuracy(final), "target": target, "init": init, "epochs": epochs,
            "signature_bits_matched": int((got[:signature_nbits] == bits[:signature_nbits]).sum()),
            "channel_bits_matched": int((got[: len(bits)] == bits).sum())}


def insider_flip(model: nn.Module, data: Dataset, ev: Evaluator, bits: np.ndarray,
                 fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0), steps: int = 100, lr: float = 0.01,
                 seed: int = 0, gamma0: float = 0.1, progress: bool = True) -> list[dict[str, float]]:
    """fake3: the attacker knows the passport and the signature and wants a new signature with a fraction of
    signs flipped: weights frozen, passports (starting at the true ones) trained with CE + sign loss."""
    layers = passport_layers(model)
    true = {n: {"gamma": layer.passport_gamma.clone(), "beta": layer.passport_beta.clone()}
            for n, layer in layers.items()}
    gen = torch.Generator().manual_seed(seed + 99)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    split = _stem_in_body(model)
    run = model.body if split else model
    model.eval()
    out = []
    with frozen_weights(model):
        for frac in tqdm(fractions, desc="insider sign flips", disable=not progress, unit="fraction"):
            target = torch.from_numpy(bits.astype(np.float32)).clone()
            flip = torch.randperm(len(target), generator=gen)[: int(round(frac * len(target)))]
            target[flip] *= -1
            params, current = _rev_params(model, true, "passport")
            opt = torch.optim.Adam(params, lr=lr)
            with passport_branch(model, True):
                for _ in range(steps):
                    idx = torch.randint(len(x), (128,), generator=gen)
                    with torch.no_grad():
                        h = model.stem(x[idx]) if split else x[idx]
                    cur = current()
                    with use_params(model, cur):
                        ce = F.cross_entropy(run(h), y[idx])
                    gam = torch.cat([g.reshape(-1) for g, _ in cur.values()])
                    loss = ce + sign_loss(gam, target, gamma0)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                final = {n: (g.detach(), b.detach()) for n, (g, b) in current().items()}
            got = torch.cat([g.reshape(-1) for g, _ in final.values()])[: len(bits)]
            achieved = float(((got >= 0).float() * 2 - 1 != torch.from_numpy(bits.astype(np.float32))).float().mean())
            out.append({"flip_fraction": frac, "achieved_flip_fraction": achieved, "acc": ev.accuracy(final)})
    return out


def public_affine_forgery(model: nn.Module, ev: Evaluator, bits: np.ndarray, signature_nbits: int
                          ) -> dict[str, Any]:
    """V2/V3: solve P (least squares) with Avg(W * P_gamma) = public gamma and Avg(W * P_beta) = public beta.

    If the passport map has full row rank, any gamma/beta is some passport's image; a forger who presents such a
    passport gets the public network's accuracy and the signature sign(public gamma)."""
    forged, residual = {}, 0.0
    for name, layer in passport_layers(model).items():
        m = passport_jacobian(layer)
        pinv = torch.linalg.pinv(m)
        forged[name] = {k: (pinv @ t.detach()).reshape(layer.passport_shape)
                        for k, t in (("gamma", layer.public_gamma), ("beta", layer.public_beta))}
        got = layer.passport_params(forged[name]["gamma"], forged[name]["beta"])
        residual = max(residual, float((got[0] - layer.public_gamma).abs().max()),
                       float((got[1] - layer.public_beta).abs().max()))
    params = compute_params(model, forged)
    fb = extract_bits(model, forged)
    return {"forged_passport_acc": ev.accuracy(params), "forged_passport_residual": residual,
            "forged_signature_bits_matched": int((fb[:signature_nbits] == bits[:signature_nbits]).sum()),
            "forged_channel_bits_matched": int((fb[: len(bits)] == bits).sum())}


# -- CERB: ambiguity attack through fully connected layer substitution (Chen et al., CVPR 2023) ---------------------
class AccessoryBlock(nn.Module):
    """The accessory block CERB puts ahead of a passport-derived parameter: g(v) = v + FC2(LeakyReLU(FC1(v))),
    FC1: C -> C/4, FC2: C/4 -> C, no bias. Its input is a fixed vector (a fake passport's gamma or beta), so it
    only reparameterises the forged vector; the paper's point is that this trains far better than the vector."""

    def __init__(self, channels: int, slope: float = 0.01):
        super().__init__()
        self.fc1 = nn.Linear(channels, max(channels // 4, 1), bias=False)
        self.fc2 = nn.Linear(max(channels // 4, 1), channels, bias=False)
        self.slope = slope

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.fc2(F.leaky_relu(self.fc1(v), self.slope))


def attacker_signature(owner: str, prefix: str = "forged:") -> str:
    """A printable ASCII string as long as the owner's and different from it: the forger's default claim."""
    n = len(owner)
    pad = "abcdefghijklmnopqrstuvwxyz0123456789"
    claim = (prefix + pad * (n // len(pad) + 1))[:n]
    return claim if claim != owner else claim[::-1] if claim[::-1] != owner else claim.swapcase()


def train_forged_params(start: Params, trainable: dict[str, tuple[bool, bool]],
                        ce: Callable[[Params, torch.Tensor], torch.Tensor], n: int, target_bits: torch.Tensor | None,
                        accessory: bool = True, steps: int = 300, lr: float = 1e-2, batch_size: int = 64,
                        gamma0: float = 0.1, seed: int = 0) -> Params:
    """The forger's training, shared by the checkpoint evaluation and the deployed-bundle attack.

    start: per layer the fake passport's (gamma', beta'); trainable: which of the two the passport derives (the
    others stay as given); ce(params, idx): cross-entropy of the frozen network run with these gamma/beta on
    items idx of the attacker's n labelled images; target_bits: +-1 signs the forged gammas (concatenated in
    layer order) are pushed to with the sign loss, or None. accessory True: CERB's blocks on gamma'/beta';
    False: the vectors themselves are trained (reverse engineering). Returns the forged gamma/beta, detached."""
    gen = torch.Generator().manual_seed(seed + 31)
    torch.manual_seed(seed + 37)  # the blocks' initialisation
    blocks, leaves = nn.ModuleList(), []
    for name, (g, b) in start.items():
        for i, vec in enumerate((g, b)):
            if not trainable[name][i]:
                continue
            if accessory:
                blocks.append(AccessoryBlock(len(vec)))
            else:
                leaves.append(nn.Parameter(vec.detach().clone()))

    def current() -> Params:
        out, k = {}, 0
        for name, (g, b) in start.items():
            pair = []
            for i, vec in enumerate((g, b)):
                if trainable[name][i]:
                    pair.append(blocks[k](vec.detach()) if accessory else leaves[k])
                    k += 1
                else:
                    pair.append(vec.detach())
            out[name] = (pair[0], pair[1])
        return out

    return optimise_forgery(list(blocks.parameters()) if accessory else leaves, current, ce, n, target_bits,
                            steps=steps, lr=lr, batch_size=batch_size, gamma0=gamma0, gen=gen)


def optimise_forgery(params: list[nn.Parameter], current: Callable[[], Params],
                     ce: Callable[[Params, torch.Tensor], torch.Tensor], n: int, target_bits: torch.Tensor | None,
                     steps: int, lr: float, batch_size: int, gamma0: float, gen: torch.Generator) -> Params:
    """Adam on `params` for CE of the network run with current() + sign loss towards target_bits."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        cur = current()
        loss = ce(cur, idx)
        if target_bits is not None:
            loss = loss + sign_loss(torch.cat([g.reshape(-1) for g, _ in cur.values()]), target_bits, gamma0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {name: (g.detach().clone(), b.detach().clone()) for name, (g, b) in current().items()}


def solve_passport(jacobian: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The passport closest to `start` (the forger's random fake, so it still looks like one) whose image under
    the linear map P -> Avg(W * P) is `target`: start + pinv(M) (target - M start). M has far more columns
    (C_in * H * W) than rows (C_out), so with full row rank every target is reached exactly."""
    flat = start.reshape(-1).to(jacobian.dtype)
    p = flat + torch.linalg.pinv(jacobian) @ (target.to(jacobian.dtype) - jacobian @ flat)
    return p.reshape(start.shape)


def attack_subset(n_total: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the attacker's labelled images: a seeded `fraction` of the training set (at least one)."""
    n = max(1, int(round(fraction * n_total)))
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed + 4049))[:n]


def cerb_forgery(model: nn.Module, data: Dataset, ev: Evaluator, bits: np.ndarray, signature_nbits: int,
                 fraction: float = 0.1, seed: int = 0, claim: str = "attacker", signature: str | None = None,
                 accessory: bool = True, steps: int = 300, lr: float | None = None, recorded_acc: float | None = None,
                 eps_f: float = 0.03, gamma0: float = 0.1, scale: float = 1.0, boxed: bool = False
                 ) -> dict[str, Any]:
    """CERB (Chen, Tian, Chen & Zhou, CVPR 2023): forge a passport that passes `verify_ownership`.

    The attacker holds the public weights and `fraction` of the labelled training set, not the passport. A fake
    passport P' (random, the owner's kind) gives gamma' = Avg(W * P'), beta' likewise; every conv weight stays
    frozen and only accessory blocks g(gamma'), g(beta') are trained (CE + sign loss towards the claimed
    signs). The forged gamma/beta are then fixed vectors, and a real passport reproducing them is solved
    (`solve_passport`); it is checked with `verify_ownership` against the owner's recorded accuracy.

    claim 'attacker': a signature of the attacker's (`signature`, default `attacker_signature` of the owner's
    length); 'owner': keep the owner's signs (the owner's string, read from `bits`); 'none': no sign loss
    (then `accessory=False` is the paper's fake2 reverse engineering on the same data). `accessory=False` trains
    the vectors directly: the ablation that says whether the block matters (same data, fake, steps and lr).
    boxed (an adaptive forger against the range check, not in the paper): the passport itself is trained, as
    scale * tanh(Q) so that it stays in the owner's range [-scale, scale], starting from the fake; no solve.
    lr: 1e-2, boxed 3e-2 (the passport acts through tanh and the map; 1e-2 was slow on both nets measured).

    verified: the papers' check (signature exact, accuracy within eps_f); verified_with_range: also every
    passport element within [-scale, scale] (`verify_ownership(passport_bound=scale)`).
    """
    t0 = time.perf_counter()
    lr = lr if lr is not None else 3e-2 if boxed else 1e-2
    owner_sig = bits_to_signature(bits[:signature_nbits])
    if claim == "attacker":
        signature = signature or attacker_signature(owner_sig)
    elif claim == "owner":
        signature = owner_sig
    elif claim == "none":
        signature = None
    else:
        raise ValueError(f"unknown claim {claim!r}; choose attacker, owner or none")
    target = None if signature is None else torch.from_numpy(signature_to_bits(signature).astype(np.float32))
    layers = passport_layers(model)
    if target is not None and len(target) > sum(layer.out_channels for layer in layers.values()):
        raise ValueError(f"signature {signature!r} needs {len(target)} bits, more than the model carries")
    gen = torch.Generator().manual_seed(seed + 53)
    fake = random_passports(model, gen, scale)
    start = compute_params(model, fake)
    trainable = {n: (layer.passport_fn in ("gamma", "both"), layer.passport_fn in ("beta", "both"))
                 for n, layer in layers.items()}
    idx_all = attack_subset(len(data.y_train), fraction, seed)
    x, y = torch.from_numpy(data.x_train[idx_all.numpy()]), torch.from_numpy(data.y_train[idx_all.numpy()])
    split = _stem_in_body(model)
    run = model.body if split else model
    model.eval()  # BatchNorm keeps the owner's running statistics (they are public weights)
    with frozen_weights(model):
        with torch.no_grad():
            hs = model.stem(x) if split else x

        def ce(params: Params, idx: torch.Tensor) -> torch.Tensor:
            with use_params(model, params):
                return F.cross_entropy(run(hs[idx]), y[idx])

        with passport_branch(model, True):
            if boxed:
                qs = {n: [nn.Parameter(torch.atanh((fake[n][k] / scale).clamp(-0.99, 0.99))) for k in ("gamma", "beta")]
                      for n in layers}

                def boxed_params() -> Params:
                    return {n: layers[n].passport_params(scale * torch.tanh(q[0]), scale * torch.tanh(q[1]))
                            for n, q in qs.items()}

                forged = optimise_forgery([q for pair in qs.values() for q in pair], boxed_params, ce, len(y), target,
                                          steps=steps, lr=lr, batch_size=64, gamma0=gamma0,
                                          gen=torch.Generator().manual_seed(seed + 31))
            else:
                forged = train_forged_params(start, trainable, ce, len(y), target, accessory=accessory, steps=steps,
                                             lr=lr, gamma0=gamma0, seed=seed)
    passports, residual = {}, 0.0
    with torch.no_grad():
        for name, layer in layers.items():
            if boxed:
                passports[name] = {k: scale * torch.tanh(q.detach()) for k, q in zip(("gamma", "beta"), qs[name],
                                                                                     strict=True)}
            else:
                jac = passport_jacobian(layer)
                passports[name] = {k: solve_passport(jac, forged[name][i], fake[name][k]) if trainable[name][i]
                                   else fake[name][k] for i, k in enumerate(("gamma", "beta"))}
            got = layer.passport_params(passports[name]["gamma"], passports[name]["beta"])
            residual = max(residual, *(float((got[i] - forged[name][i]).abs().max()) for i in range(2)
                                       if trainable[name][i]))
    sig_gamma = torch.cat([g.reshape(-1) for g, _ in forged.values()]).numpy()
    signs = np.where(sig_gamma >= 0, 1, -1)[:signature_nbits]
    flipped = int((signs != bits[:signature_nbits]).sum())
    out: dict[str, Any] = {
        "fraction": fraction, "train_images": int(len(y)), "accessory": accessory and not boxed, "boxed": boxed,
        "claim": claim, "steps": steps,
        "params_acc": ev.accuracy(forged), "owner_bits_flipped": flipped,
        "owner_bits_flipped_frac": flipped / signature_nbits, "passport_residual": residual,
        "passport_max_abs": max(float(p.abs().max()) for pp in passports.values() for p in pp.values()),
    }
    if signature is not None:
        res = verify_ownership(model, passports, signature, data.x_test, data.y_test, recorded_acc, eps_f=eps_f,
                               passport_bound=scale)
        out.update({"signature": signature, "asked_flips": int((target.numpy()[:signature_nbits]
                                                                 != bits[:signature_nbits]).sum()),
                    "acc": res.accuracy, "signature_exact": res.signature_match,
                    "signature_bits_matched": res.signature_bits_matched, "fidelity_ok": res.fidelity_ok,
                    "verified": bool(res.signature_match and res.fidelity_ok),
                    "passport_in_range": res.passport_in_range, "verified_with_range": res.verified})
    else:
        with use_passports(model, passports):
            out["acc"] = callable_accuracy(model_predict(model, "passport"), data.x_test, data.y_test)
    out["seconds"] = time.perf_counter() - t0
    return out


CERB_FRACTIONS = (0.02, 0.1)  # the attacker's share of the training set (the paper: 2% and 10%)
CERB_VARIANTS = (  # (row key, accessory blocks, claim): CERB, the same without blocks, fake2, keep the owner's
    # signs; "boxed": the passport trained inside the owner's range (an adaptive forger against the range check)
    ("accessory", True, "attacker"), ("direct", False, "attacker"), ("reverse", False, "none"),
    ("keep_owner", True, "owner"), ("boxed", False, "attacker"),
)


def cerb_table(model: nn.Module, data: Dataset, ev: Evaluator, bits: np.ndarray, signature_nbits: int,
               fractions: tuple[float, ...] = CERB_FRACTIONS, seed: int = 0, steps: int = 300,
               progress: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """`cerb_forgery` at each data fraction, in every CERB_VARIANTS setting, on the same images and fake."""
    rows = []
    for frac in tqdm(fractions, desc="CERB forgery", disable=not progress, unit="fraction"):
        row: dict[str, Any] = {"fraction": frac}
        for key, accessory, claim in CERB_VARIANTS:
            row[key] = cerb_forgery(model, data, ev, bits, signature_nbits, fraction=frac, seed=seed, claim=claim,
                                    accessory=accessory, steps=steps, boxed=key == "boxed", **kwargs)
        rows.append(row)
    return rows


def prune_global(model: nn.Module, rate: float) -> None:
    """Class-blind pruning (See et al.): zero the `rate` fraction of smallest-magnitude conv/linear weights."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = int(rate * len(flat))
    if k == 0:
        return
    threshold = flat.kthvalue(k).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))


def pruning_curve(model: nn.Module, data: Dataset, bits: np.ndarray, signature_nbits: int,
                  rates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                  progress: bool = True) -> list[dict[str, Any]]:
    out = []
    for rate in tqdm(rates, desc="pruning", disable=not progress, unit="rate"):
        m = copy.deepcopy(model)
        prune_global(m, rate)
        got = extract_bits(m)
        out.append({"rate": rate, "acc": branch_accuracy(m, data.x_test, data.y_test, "passport"),
                    "signature_detection": float((got[:signature_nbits] == bits[:signature_nbits]).mean()),
                    "signature_match": bool((got[:signature_nbits] == bits[:signature_nbits]).all()),
                    "channel_bits_detection": float((got[: len(bits)] == bits).mean())})
    return out


def finetune_task(data: Dataset) -> Dataset:
    """Another task on the same data: inverted images (1 - x) with permuted labels y -> (3y + 1) mod 10."""
    perm = (3 * np.arange(data.num_classes) + 1) % data.num_classes
    return Dataset(data.name + "-inverted-relabelled", 1.0 - data.x_train, perm[data.y_train],
                   1.0 - data.x_test, perm[data.y_test], data.num_classes)


def finetune_attack(model: nn.Module, data: Dataset, bits: np.ndarray, signature_nbits: int, branch: str,
                    epochs: int = 2, subset: int = 2000, lr: float = 1e-3, seed: int = 0,
                    trigger: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> dict[str, Any]:
    """Removal attack: fine-tune all weights (no sign loss) on another task; is the signature still there?

    `branch`: 'public' for V2/V3 (what a pirate holds), 'passport' for V1 (fine-tuning needs the passport)."""
    m = copy.deepcopy(model)
    task = finetune_task(data)
    gen = torch.Generator().manual_seed(seed + 5)
    x, y = torch.from_numpy(task.x_train[:subset]), torch.from_numpy(task.y_train[:subset])
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    m.train()
    with passport_branch(m, branch == PASSPORT_BRANCH):
        for ep in range(epochs):
            for idx in tqdm(torch.randperm(len(x), generator=gen).split(128), disable=not progress,
                            desc=f"fine-tune to {task.name} epoch {ep + 1}/{epochs}", unit="batch"):
                loss = F.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    m.eval()
    got = extract_bits(m)
    out = {"task": task.name, "branch": branch, "epochs": epochs, "train_images": int(len(x)),
           "new_task_acc": branch_accuracy(m, task.x_test, task.y_test, branch),
           "signature_detection": float((got[:signature_nbits] == bits[:signature_nbits]).mean()),
           "signature_match": bool((got[:signature_nbits] == bits[:signature_nbits]).all()),
           "channel_bits_detection": float((got[: len(bits)] == bits).mean())}
    if trigger is not None:
        out["trigger_acc_after"] = branch_accuracy(m, trigger[0], trigger[1], branch)
    return out


# -- the report --------------------------------------------------------------------------------------------------
def run_passport_eval(ckpt: ProtectedCheckpoint, secret: dict[str, Any], data: Dataset, out_dir: Path,
                      n_fakes: int = 200, seed: int = 0, rev_epochs: int = 3, rev_target: str = REV_PARAMS,
                      finetune_epochs: int = 2, signature: str | None = None, skip: tuple[str, ...] = (),
                      progress: bool = True, checkpoint_path: Path | None = None,
                      data_dir: Path | None = None, cerb_fractions: tuple[float, ...] = CERB_FRACTIONS,
                      cerb_steps: int = 300) -> dict[str, Any]:
    """Every measurement of the module docstring; writes passport_eval.{json,md} and PNG plots to out_dir.

    With `checkpoint_path` (scheme V1) the checkpoint is also exported and served locally: deployed_acc is
    measured over gRPC through the trusted module, public_onnx_acc on the bundle's public.onnx alone."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = passport_model(ckpt, secret)
    scheme = secret["scheme"]
    bits = secret["bits"].numpy().astype(np.int8)
    nsig = int(secret["signature_nbits"])
    trigger = None if secret.get("trigger_x") is None else (secret["trigger_x"].numpy(), secret["trigger_y"].numpy())
    ev = Evaluator(model, data.x_test, data.y_test)
    valid = ev.accuracy()
    got = extract_bits(model)
    r: dict[str, Any] = {
        "model": ckpt.model_name, "dataset": data.name, "scheme": scheme, "passport_type": secret["passport_type"],
        "passport_fn": secret["passport_fn"], "test_images": int(len(data.y_test)),
        "baseline_acc": ckpt.metrics.get("baseline_acc"), "valid_acc": valid,
        "recorded_valid_acc": ckpt.metrics.get("valid_acc"),
        "signature_bits": nsig, "designated_bits": len(bits), "capacity_bits": len(got),
        "signature_match": bool((got[:nsig] == bits[:nsig]).all()),
        "signature_decoded": bits_to_signature(got[:nsig]),
        "channel_bits_matched": int((got[: len(bits)] == bits).sum()),
        "deployed_acc": None, "public_onnx_acc": None,
    }
    if signature is not None:
        r["signature_claim_verified"] = verify_ownership(
            model, secret["passports"], signature, data.x_test, data.y_test, r["recorded_valid_acc"],
            eps_f=secret.get("eps_f", 0.03), trigger=trigger).verified
    if scheme != "v1":
        r["public_acc"] = branch_accuracy(model, data.x_test, data.y_test, "public")
    if trigger is not None:
        r["trigger_acc"] = branch_accuracy(model, trigger[0], trigger[1], "public" if scheme != "v1" else "passport")
    scale = float(secret.get("passport_scale", 1.0))
    fakes = fake_accuracies(model, ev, n_fakes, seed=seed + 10_000, kind="random", scale=scale, progress=progress)
    r.update({"fake_n": int(n_fakes), "fake_kind": "random", "fake_max_acc": float(fakes.max()),
              "fake_mean_acc": float(fakes.mean()), "fake_p90_acc": float(np.quantile(fakes, 0.9)),
              "fake_accs": [float(a) for a in fakes]})
    image_fakes = None
    if secret["passport_type"] != "random" and "image_fakes" not in skip:
        image_fakes = fake_accuracies(model, ev, n_fakes, seed=seed + 20_000, kind=secret["passport_type"],
                                      images=data.x_test, progress=progress)
        r.update({"fake_image_max_acc": float(image_fakes.max()), "fake_image_mean_acc": float(image_fakes.mean()),
                  "fake_image_accs": [float(a) for a in image_fakes]})
    if "svd" not in skip:
        r.update(svd_attack(model, ev))
    r["reverse_engineered_acc"] = None
    if "reverse" not in skip:
        rev = reverse_engineer(model, data, ev, bits, nsig, epochs=rev_epochs, seed=seed, target=rev_target,
                               scale=scale, progress=progress)
        r.update({"reverse_engineered_acc": rev["acc"], "reverse_engineered": rev})
    if "reverse_svd" not in skip and "reverse" not in skip:
        rev = reverse_engineer(model, data, ev, bits, nsig, epochs=rev_epochs, seed=seed, init="svd",
                               progress=progress)
        r.update({"reverse_engineered_svd_acc": rev["acc"], "reverse_engineered_svd": rev})
    if "insider" not in skip:
        r["insider_flip"] = insider_flip(model, data, ev, bits, seed=seed, gamma0=secret.get("gamma0", 0.1),
                                         progress=progress)
    if scheme != "v1" and "forgery" not in skip:
        r.update(public_affine_forgery(model, ev, bits, nsig))
    if "cerb" not in skip:
        r["cerb"] = cerb_table(model, data, ev, bits, nsig, cerb_fractions, seed=seed, steps=cerb_steps,
                               recorded_acc=r["recorded_valid_acc"] or valid, eps_f=secret.get("eps_f", 0.03),
                               gamma0=secret.get("gamma0", 0.1), scale=scale, progress=progress)
    if "pruning" not in skip:
        r["pruning"] = pruning_curve(model, data, bits, nsig, progress=progress)
    if "finetune" not in skip:
        r["finetune"] = finetune_attack(model, data, bits, nsig, "public" if scheme != "v1" else "passport",
                                        epochs=finetune_epochs, seed=seed, trigger=trigger, progress=progress)
    if "deploy" not in skip:
        r.update(deployed_accuracy(checkpoint_path, scheme, data, data_dir))
    r["eval_seconds"] = time.perf_counter() - t0
    (out_dir / "passport_eval.json").write_text(json.dumps(r, indent=2))
    (out_dir / "passport_eval.md").write_text(markdown_report(r))
    write_plots(r, out_dir)
    return r


def deployed_accuracy(checkpoint_path: Path | None, scheme: str, data: Dataset, data_dir: Path | None
                      ) -> dict[str, Any]:
    """deployed_acc (bundle + trusted module + gRPC with a license) and public_onnx_acc (public.onnx alone)."""
    if scheme != "v1":
        return {"deployed_note": f"scheme {scheme} distributes the public branch; only V1 deploys through the "
                                 "trusted module"}
    if checkpoint_path is None:
        return {"deployed_note": "not measured (no checkpoint path given)"}
    from sealnet.deployment import LocalDeployment

    with LocalDeployment.export(checkpoint_path, data_dir=data_dir) as dep:
        return {"deployed_acc": dep.accuracy(data.x_test, data.y_test, dep.license()),
                "public_onnx_acc": dep.public_onnx_accuracy(data.x_test, data.y_test),
                "public_unit_params_acc": dep.manifest["checks"]["public_unit_params_acc"],
                "deployed_note": "bundle exported with a fresh key and keystore, served locally, queried over gRPC"}


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def markdown_report(r: dict[str, Any]) -> str:
    lines = [f"# Passport evaluation: {r['model']} on {r['dataset']} (scheme {r['scheme']}, "
             f"{r['passport_type']} passports, passport function '{r['passport_fn']}')", "",
             "| measurement | value |", "|---|---|",
             f"| baseline (plain counterpart) | {_pct(r['baseline_acc'])} |",
             f"| valid passport | {_pct(r['valid_acc'])} |"]
    if "public_acc" in r:
        lines.append(f"| public branch (distributed network, no passport) | {_pct(r['public_acc'])} |")
    lines += [f"| fake1: {r['fake_n']} random passports, max / mean / p90 | {_pct(r['fake_max_acc'])} / "
              f"{_pct(r['fake_mean_acc'])} / {_pct(r['fake_p90_acc'])} |"]
    if "fake_image_max_acc" in r:
        lines.append(f"| fake1: {r['fake_n']} other-image passports, max / mean | {_pct(r['fake_image_max_acc'])} / "
                     f"{_pct(r['fake_image_mean_acc'])} |")
    lines.append(f"| signature ({r['signature_bits']} bits) recovered exactly | {r['signature_match']} "
                 f"(decoded {r['signature_decoded']!r}; {r['channel_bits_matched']}/{r['designated_bits']} designated "
                 f"signs, capacity {r['capacity_bits']}) |")
    if "svd_attack_acc" in r:
        leak = ", ".join(f"{v:.2f}" for v in r["gamma_leak_cos"].values())
        lines.append(f"| svd attack (data-free, best sign combination) | {_pct(r['svd_attack_acc'])} "
                     f"(abs cos(u1, gamma) per layer: {leak}) |")
    for key, how in (("reverse_engineered", "random start (paper)"), ("reverse_engineered_svd", "SVD start (ours)")):
        if key in r:
            rev = r[key]
            lines.append(f"| fake2: {rev['target']} reverse-engineered with training data, {how} | "
                         f"{_pct(rev['acc'])} (signature bits kept {rev['signature_bits_matched']}/"
                         f"{r['signature_bits']}) |")
    if "forged_passport_acc" in r:
        lines.append(f"| V2/V3 forgery: passport solved for the public gamma/beta | {_pct(r['forged_passport_acc'])} "
                     f"(signature bits matching the owner's: {r['forged_signature_bits_matched']}/"
                     f"{r['signature_bits']}) |")
    if "trigger_acc" in r:
        lines.append(f"| V3 trigger set detected | {_pct(r['trigger_acc'])} |")
    if r.get("deployed_acc") is not None:
        lines.append(f"| deployed: bundle + trusted module + gRPC, with a license | {_pct(r['deployed_acc'])} |")
        lines.append(f"| public.onnx alone (shipped zero gamma/beta) | {_pct(r['public_onnx_acc'])} |")
        lines.append(f"| public.onnx with gamma=1, beta=0 | {_pct(r['public_unit_params_acc'])} |")
    else:
        lines.append(f"| deployed / public ONNX accuracy | {r.get('deployed_note', 'not measured')} |")
    if "insider_flip" in r:
        lines += ["", "## fake3: insider forges a signature with flipped signs", "",
                  "| flipped (asked) | flipped (achieved) | accuracy |", "|---|---|---|"]
        lines += [f"| {row['flip_fraction']:.0%} | {row['achieved_flip_fraction']:.1%} | {_pct(row['acc'])} |"
                  for row in r["insider_flip"]]
    if "cerb" in r:
        lines += ["", "## CERB forgery (Chen et al., CVPR 2023): accessory FC blocks on a fake passport's gamma/beta, "
                  "then a passport solved for them", "",
                  "Attacker: public weights + a fraction of the labelled training set. `verified`: the solved passport "
                  "passes verify_ownership with the claimed signature (signs exact and accuracy within eps_f of the "
                  "owner's recorded one).", "",
                  "| data | variant | claimed signature | accuracy | owner's bits flipped | signature exact | "
                  "verified | passport max abs (residual) | verified with range check |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["cerb"]:
            for key, label in (("accessory", "CERB (accessory blocks)"), ("direct", "same, vectors trained directly"),
                               ("reverse", "fake2: no sign loss, vectors"), ("keep_owner", "CERB, owner's signs kept"),
                               ("boxed", "passport trained in [-1, 1]")):
                if key not in row:
                    continue
                c = row[key]
                lines.append(f"| {row['fraction']:.0%} ({c['train_images']} images) | {label} | "
                             f"{repr(c['signature']) if 'signature' in c else '-'} | {_pct(c['acc'])} | "
                             f"{c['owner_bits_flipped']}/"
                             f"{r['signature_bits']} | {c.get('signature_exact', 'n/a')} | "
                             f"{c.get('verified', 'n/a')} | "
                             f"{c['passport_max_abs']:.3g} ({c['passport_residual']:.1e}) | "
                             f"{c.get('verified_with_range', 'n/a')} |")
    if "pruning" in r:
        lines += ["", "## Pruning (class-blind, global magnitude)", "",
                  "| rate | accuracy | signature bits detected | exact |", "|---|---|---|---|"]
        lines += [f"| {row['rate']:.0%} | {_pct(row['acc'])} | {row['signature_detection']:.1%} | "
                  f"{row['signature_match']} |" for row in r["pruning"]]
    if "finetune" in r:
        f = r["finetune"]
        lines += ["", f"## Fine-tuning to {f['task']} ({f['epochs']} epochs, {f['train_images']} images, "
                  f"{f['branch']} branch)", "",
                  f"new-task accuracy {_pct(f['new_task_acc'])}; signature bits detected "
                  f"{f['signature_detection']:.1%} (exact: {f['signature_match']})"
                  + (f"; trigger set after {_pct(f['trigger_acc_after'])}" if "trigger_acc_after" in f else "")]
    lines += ["", f"Evaluation took {r['eval_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write_plots(r: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 100, 51)
    ax.hist(100 * np.asarray(r["fake_accs"]), bins=bins, color="tab:blue", alpha=0.8,
            label=f"fake passports (n={r['fake_n']})")
    if "fake_image_accs" in r:
        ax.hist(100 * np.asarray(r["fake_image_accs"]), bins=bins, color="tab:purple", alpha=0.6,
                label="fake passports (other images)")
    ax.axvline(100 * r["valid_acc"], color="tab:red", lw=3, label="valid passport")
    if r.get("baseline_acc") is not None:
        ax.axvline(100 * r["baseline_acc"], color="tab:green", ls="--", label="original (no passport)")
    if r.get("reverse_engineered_acc") is not None:
        ax.axvline(100 * r["reverse_engineered_acc"], color="tab:orange", ls=":", lw=2, label="reverse-engineered")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("count")
    ax.set_title(f"{r['model']} {r['scheme']} ({r['passport_type']}): valid vs fake passports")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "passport_hist.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if "pruning" in r or "insider_flip" in r:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if "pruning" in r:
            rates = [100 * row["rate"] for row in r["pruning"]]
            axes[0].plot(rates, [100 * row["acc"] for row in r["pruning"]], "o-", label="accuracy")
            axes[0].plot(rates, [100 * row["signature_detection"] for row in r["pruning"]], "s-",
                         label="signature bits detected")
            axes[0].set_xlabel("pruning rate (%)")
            axes[0].set_ylabel("%")
            axes[0].set_title("pruning")
            axes[0].legend(fontsize=8)
        if "insider_flip" in r:
            axes[1].plot([100 * row["flip_fraction"] for row in r["insider_flip"]],
                         [100 * row["acc"] for row in r["insider_flip"]], "o-")
            axes[1].set_xlabel("signature signs flipped by the insider (%)")
            axes[1].set_ylabel("test accuracy (%)")
            axes[1].set_title("fake3: insider forgery")
        fig.tight_layout()
        paths.append(out_dir / "passport_attacks.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# -- several seeds ---------------------------------------------------------------------------------------------------
SEED_TABLE = (  # (flattened metric, label) for the Markdown summary of `passport-eval --seeds`
    ("baseline_acc", "baseline (plain counterpart)"), ("valid_acc", "valid passport"),
    ("valid_minus_baseline", "valid - baseline"), ("public_acc", "public branch (no passport)"),
    ("fake_max_acc", "random fake passports: max"), ("fake_mean_acc", "random fake passports: mean"),
    ("signature_match", "signature recovered exactly (share of runs)"), ("svd_attack_acc", "SVD attack, data-free"),
    ("reverse_engineered_acc", "fake2: reverse-engineered, random start"),
    ("reverse_engineered_svd_acc", "fake2: reverse-engineered, SVD start"),
    ("forged_passport_acc", "V2/V3 forgery"),
    *((f"cerb@{f:g}.{key}.{m}", f"{f:.0%} of the training data: {label}: {what}") for f in CERB_FRACTIONS
      for key, m, label, what in (
          ("accessory", "acc", "CERB (accessory blocks), attacker's signature", "accuracy"),
          ("accessory", "verified", "CERB (accessory blocks), attacker's signature", "verified (share of runs)"),
          ("direct", "acc", "same, vectors trained directly", "accuracy"),
          ("direct", "verified", "same, vectors trained directly", "verified (share of runs)"),
          ("reverse", "acc", "fake2 (no sign loss, vectors)", "accuracy"),
          ("keep_owner", "acc", "CERB keeping the owner's signs", "accuracy"),
          ("keep_owner", "verified", "CERB keeping the owner's signs", "verified (share of runs)"),
          ("keep_owner", "verified_with_range", "CERB keeping the owner's signs", "verified with the range check"),
          ("boxed", "acc", "passport trained in [-1, 1]", "accuracy"),
          ("boxed", "signature_exact", "passport trained in [-1, 1]", "attacker's signature exact"),
          ("boxed", "verified_with_range", "passport trained in [-1, 1]", "verified with the range check"))),
    ("trigger_acc", "V3 trigger set detected"),
    *((f"insider_flip@{f:g}.acc", f"fake3: insider flips {f:.0%} of the signs: accuracy") for f in (0.1, 0.5, 1.0)),
    ("pruning@0.5.acc", "pruning 50%: accuracy"), ("pruning@0.5.signature_match", "pruning 50%: signature exact"),
    ("pruning@0.9.signature_detection", "pruning 90%: signature bits detected"),
    ("finetune.new_task_acc", "fine-tuned to a new task: its accuracy"),
    ("finetune.signature_detection", "fine-tuned to a new task: signature bits detected"),
    ("deployed_acc", "deployed over gRPC"), ("public_onnx_acc", "public.onnx alone (shipped zeros)"),
    ("public_unit_params_acc", "public.onnx with gamma=1, beta=0"),
)


def run_passport_eval_seeds(ckpt: ProtectedCheckpoint, secret: dict[str, Any], data: Dataset, out_dir: Path,
                            seeds: int, signature: str, *, seed: int = 0, log: Callable[[str], None] = print,
                            **eval_kwargs: Any) -> dict[str, Any]:
    """`seeds` passport nets trained anew with the checkpoint's recipe (signature `signature`, training seed
    checkpoint seed + i: new passports, new baseline), each through run_passport_eval (evaluation seed `seed`
    + i); OUT/seed-i/ per run, OUT/passport_eval_seeds.{json,md}: mean, min and max of every measurement."""
    from sealnet.evaluate.multiseed import flatten, summarize
    from sealnet.protect.passport_train import PassportConfig, default_passport_path, protect_passport
    from sealnet.protect.train import TrainConfig

    train = secret.get("train")
    if not isinstance(train, dict):
        raise ValueError("the passport file does not record its training recipe (written by an older sealnet "
                         "protect): protect it again to evaluate it over several seeds")
    pcfg = PassportConfig(**(secret["config"] | {"signature": signature}))
    runs = []
    for i in range(seeds):
        run_dir = Path(out_dir) / f"seed-{i}"
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=int(train["epochs"]), batch_size=int(train["batch_size"]), lr=float(train["lr"]),
                          seed=ckpt.seed + i, progress=False)
        new = protect_passport(data, run_dir / "passport.pt", cfg, pcfg, model_name=ckpt.model_name,
                               model_config=ckpt.model_config)
        r = run_passport_eval(new, load_passport_file(default_passport_path(run_dir / "passport.pt")), data,
                              run_dir, seed=seed + i, signature=signature, checkpoint_path=run_dir / "passport.pt",
                              **eval_kwargs)
        m = flatten({k: v for k, v in r.items() if k not in ("test_images", "signature_bits", "designated_bits",
                                                             "capacity_bits")})
        if r["baseline_acc"] is not None:
            m["valid_minus_baseline"] = r["valid_acc"] - r["baseline_acc"]
        runs.append({"run": i, "train_seed": cfg.seed, "eval_seed": seed + i, "seconds": time.perf_counter() - t0,
                     "metrics": m})
        log(f"seed run {i}: valid {r['valid_acc']:.2%}, baseline {r['baseline_acc']:.2%}, "
            f"{runs[-1]['seconds']:.0f} s")
    report = {"dataset": data.name, "model": ckpt.model_name, "scheme": secret["scheme"], "seeds": seeds,
              "runs": runs, "summary": summarize([r["metrics"] for r in runs])}
    (Path(out_dir) / "passport_eval_seeds.json").write_text(json.dumps(report, indent=2))
    (Path(out_dir) / "passport_eval_seeds.md").write_text(passport_seeds_markdown(report))
    return report


def passport_seeds_markdown(report: dict[str, Any]) -> str:
    """The summary as a table: mean [min, max] over the runs."""
    from sealnet.evaluate.multiseed import spread

    s = report["summary"]
    lines = [f"# Passport evaluation over {report['seeds']} seeds: {report['model']} on {report['dataset']} "
             f"(scheme {report['scheme']})", "", "| measurement | mean [min, max] |", "|---|---|"]
    lines += [f"| {label} | {spread(s[key])} |" for key, label in SEED_TABLE if key in s]
    return "\n".join([*lines, ""])
