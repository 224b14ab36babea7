"""Attacks on passport bundles (scheme V1): what the copied public network gives without the trusted module,
guessed scale/bias, and the insider who reads gamma/beta off the runtime's side of the protocol.

The white-box attacks of the passport papers (fake passports against the checkpoint, reverse engineering with
training data, sign flips, pruning, fine-tuning) need the protected checkpoint and live in `sealnet
passport-eval`; the suite works from what a deployment exposes: the bundle and the services.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sealnet.attacks.base import Budget, Metric, Outcome, Skip, Target, pct, progress, torch_threads
from sealnet.attacks.plots import histogram
from sealnet.attacks.registry import register_attack

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


REVERSE_MARGIN = 0.20  # docs/security.md: reverse-engineered gamma/beta <= baseline - 20 pts
_SHAPE_OPS = ("Reshape", "Unsqueeze", "Expand", "Identity", "Cast")
_NORM_OPS = ("BatchNormalization", "InstanceNormalization", "GroupNormalization", "Identity")


def passport_convs(model: onnx.ModelProto, gamma_names: list[str]) -> list[onnx.NodeProto]:
    """The convolution whose normalised output each gamma scales, traced through public.onnx (gamma -> reshape ->
    Mul <- normalisation <- Conv): what a holder of the file reads off to solve passports for its layers."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convs = []
    for gamma in gamma_names:
        name, node = gamma, None
        while True:
            users = consumers.get(name, [])
            if len(users) != 1:
                raise ValueError(f"public.onnx: {gamma} feeds {len(users)} nodes at {name!r}, expected one")
            node = users[0]
            if node.op_type not in _SHAPE_OPS:
                break
            name = node.output[0]
        if node.op_type != "Mul":
            raise ValueError(f"public.onnx: {gamma} scales nothing (reaches a {node.op_type} node)")
        src = producer.get(next(i for i in node.input if i != name))
        while src is not None and src.op_type in _NORM_OPS:
            src = producer.get(src.input[0])
        if src is None or src.op_type != "Conv":
            raise ValueError(f"public.onnx: no convolution before the layer {gamma} scales")
        convs.append(src)
    return convs


def passport_maps(model: onnx.ModelProto, convs: list[onnx.NodeProto], input_shape: tuple[int, ...]) -> list:
    """Per passport convolution: (passport shape = its input's shape, P -> Avg(W * P), that map as a matrix)."""
    import torch
    import torch.nn.functional as F

    from sealnet.protect.onnx_torch import OnnxModule

    weights = {i.name: i for i in model.graph.initializer}
    maps = []
    for conv in convs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        with torch.no_grad():
            shape = tuple(OnnxModule(model, output=conv.input[0])(torch.zeros(1, *input_shape)).shape[1:])
        w = torch.from_numpy(np.array(numpy_helper.to_array(weights[conv.input[1]]), copy=True))
        stride, pads = tuple(attrs.get("strides", (1, 1))), tuple(list(attrs.get("pads", [0, 0, 0, 0]))[:2])

        def avg(p, w=w, stride=stride, pads=pads):
            return F.conv2d(p[None], w, None, stride, pads).mean((2, 3))[0]

        maps.append((shape, avg, torch.func.jacrev(avg)(torch.zeros(shape)).reshape(w.shape[0], -1).detach()))
    return maps


@register_attack(
    "passport-cerb-forgery", suite="model", methods=("passport",),
    title="CERB ambiguity attack: accessory FC blocks on a fake passport, then a passport solved for the result",
    targets="forged accuracy <= baseline - 20 pts, and no forged passport passes `sealnet verify --bundle`",
    knowledge="A1 forger (Chen et al., CVPR 2023): public.onnx (conv weights, BatchNorm statistics) and 2% / 10% "
              "of the labelled training set; no passport, no license. Draws a U[-1, 1] fake passport, trains "
              "g(v) = v + FC2(LeakyReLU(FC1(v))) on its gamma/beta with every weight frozen (CE + sign loss "
              "towards the forger's own signature), solves a passport whose Avg(W * P) is the result, and claims "
              "ownership with it through `sealnet verify --bundle` (its passport file records its own accuracy).")
def passport_cerb_forgery(target: Target, budget: Budget, out: Path) -> Outcome:
    import torch
    import torch.nn.functional as F

    from sealnet.evaluate.passport_eval import (
        CERB_FRACTIONS,
        attack_subset,
        attacker_signature,
        solve_passport,
        train_forged_params,
        verify_bundle,
    )
    from sealnet.protect.onnx_torch import OnnxModule
    from sealnet.protect.passport import signature_to_bits
    from sealnet.protect.passport_train import save_passport_file

    manifest = target.bundle.manifest
    if manifest.get("passport_fn", "both") != "both":
        raise Skip(f"passport function {manifest.get('passport_fn')!r}: `verify --bundle` checks function 'both' only")
    names = list(manifest["passport_params"])
    gammas, betas = names[0::2], names[1::2]
    model = target.public_model
    convs = passport_convs(model, gammas)
    layer_names = []
    for conv in convs:
        w = conv.input[1]
        if not (w.startswith("model.") and w.endswith(".conv.weight")):
            raise Skip(f"conv weight {w!r} is not named model.<layer>.conv.weight, which `verify --bundle` reads")
        layer_names.append(w[len("model.") : -len(".conv.weight")])
    input_shape = tuple(manifest["input"]["shape"][1:])
    owner_acc, source = target.authorized_accuracy()
    baseline = manifest.get("training", {}).get("baseline_acc")
    shapes = _param_shapes(target)
    capacity = sum(int(np.prod(shapes[g])) for g in gammas)
    signature = attacker_signature("?" * min(13, capacity // 8))
    bits = torch.from_numpy(signature_to_bits(signature).astype(np.float32))
    data = target.data
    metrics, details = [Metric("owner_acc", owner_acc, note=source)], {"signature": signature, "fractions": {}}
    with torch_threads(1):
        net = OnnxModule(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        maps = passport_maps(model, convs, input_shape)
        for frac in progress(CERB_FRACTIONS, desc="CERB forgery", unit="fraction"):
            idx = attack_subset(len(data.y_train), frac, target.seed).numpy()
            x, y = torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx])
            gen = torch.Generator().manual_seed(target.seed + 53)
            fake = {layer: {k: torch.rand(shape, generator=gen) * 2 - 1 for k in ("gamma", "beta")}
                    for layer, (shape, _, _) in zip(layer_names, maps, strict=True)}
            start = {layer: (avg(fake[layer]["gamma"]), avg(fake[layer]["beta"]))
                     for layer, (_, avg, _) in zip(layer_names, maps, strict=True)}

            def ce(params, i, x=x, y=y):
                feed = {n: t for layer, g, b in zip(layer_names, gammas, betas, strict=True)
                        for n, t in ((g, params[layer][0]), (b, params[layer][1]))}
                return F.cross_entropy(net(x[i], feed), y[i])

            forged = train_forged_params(start, {layer: (True, True) for layer in layer_names}, ce, len(y), bits,
                                         steps=budget.forge_steps, seed=target.seed)
            with torch.no_grad():
                passports = {layer: {k: solve_passport(jac, forged[layer][i], fake[layer][k])
                                     for i, k in enumerate(("gamma", "beta"))}
                             for layer, (_, _, jac) in zip(layer_names, maps, strict=True)}
            # The forger's passport file records the forger's own accuracy and a generous tolerance; the verifier
            # must judge fidelity against the owner's record instead (verify_bundle: the signed manifest).
            own_acc = target.accuracy_with_params({n: t.numpy() for layer, g, b in zip(layer_names, gammas, betas,
                                                                                      strict=True)
                                                   for n, t in ((g, forged[layer][0]), (b, forged[layer][1]))})
            path = save_passport_file({"passport_fn": "both", "passports": passports, "eps_f": 1.0},
                                      out / f"cerb-forged-{frac:g}.passport.pt", valid_acc=own_acc)
            res = verify_bundle(target.bundle_dir, path, signature, data)
            details["fractions"][f"{frac:g}"] = {"train_images": int(len(y)), "steps": budget.forge_steps,
                                                 "forger_recorded_acc": own_acc, **res.to_dict(),
                                                 "passport_file": path.name}
            acc_note = f"{len(y)} labelled images; the forged passport on public.onnx"
            metrics.append(Metric(f"forged_acc@{frac:g}", float(res.accuracy), *(
                ("<=", baseline - REVERSE_MARGIN) if baseline is not None else (None, None)), note=acc_note))
            metrics.append(Metric(f"forgery_verified@{frac:g}", float(res.verified), "==", 0.0, unit="count",
                                  note=f"`sealnet verify --bundle` with {signature!r}: signature "
                                       f"{'exact' if res.signature_match else 'wrong'}, accuracy within eps_f of "
                                       f"the owner's {pct(owner_acc)}: {res.fidelity_ok}; passport within the "
                                       f"owner's range: {res.passport_in_range}"))
    return Outcome(metrics, details=details, notes=[
        "A verified forgery is a second passport that passes the paper's ownership check with another signature: "
        "the claim then rests on who registered a signature first, not on holding the passport."])
