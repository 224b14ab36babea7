"""Digital passports (Fan, Ng & Chan), scheme V1 deployed: the public network ships with zero scale/bias in its
passport layers, and the trusted module derives gamma, beta = Avg(W * P) from the sealed passports."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealnet.bundle import PARAMS
from sealnet.errors import InvalidArgument
from sealnet.protect import DEFAULT_SIGNATURE, PASSPORT_FNS, PASSPORT_MODELS, PASSPORT_TYPES, SCHEMES
from sealnet.protect.methods.base import ExportOptions, ProtectionMethod, Split, register

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sealnet.data import Dataset
    from sealnet.protect.checkpoint import ProtectedCheckpoint


@register
class Passport(ProtectionMethod):
    name = "passport"
    summary = "digital passports (Fan, Ng & Chan): the module derives the passport layers' gamma/beta"
    user_model_refusal = ("passport layers are sealnet's own networks (resnet18_p, alexnet_p, cnn_p), whose "
                          "Conv->BN pairs are trained with their passports; converting a user's network is not "
                          "supported: protect it with sealed-head (or transform)")
    module_step = PARAMS
    own_model_flag = True  # --model names one of its passport networks
    attack_module = "sealnet.attacks.passport_attacks"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scheme", default="v1", choices=SCHEMES,
                            help="v1: passport needed at inference; v2: private passport, public gamma/beta; "
                                 "v3: v2 + trigger set")
        parser.add_argument("--passport-type", default="random", choices=PASSPORT_TYPES,
                            help="T1 random patterns, T2 one fixed image's feature maps, T3 random-shuffled images")
        parser.add_argument("--passport-fn", default="both", choices=PASSPORT_FNS,
                            help="which of gamma/beta are derived from passports (Digital Passport V1/V2/V3)")
        parser.add_argument("--signature", default=DEFAULT_SIGNATURE,
                            help="ASCII signature embedded in sign(gamma)")
        parser.add_argument("--model", default="cnn_p", metavar="NETWORK",
                            help=f"the passport network: {', '.join(PASSPORT_MODELS)} (not a network of your own)")
        parser.add_argument("--width", type=int, default=None,
                            help="resnet18_p: base channel width (default 64, the paper's; e.g. 16 trains fast "
                                 "on a CPU)")
        parser.add_argument("--fake-weight", type=float, default=None,
                            help="anti-fake term weight (0: the papers' loss)")
        parser.add_argument("--decor-weight", type=float, default=None,
                            help="decorrelation term weight (0: the papers')")
        parser.add_argument("--sign-weight", type=float, default=None)
        parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default=None)
        parser.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                            help="adam (default) or sgd with momentum 0.9 (the papers' CIFAR recipe: --lr 0.01)")
        parser.add_argument("--no-warm-start", dest="warm_start", action="store_false", default=None,
                            help="train the passport net from scratch instead of from the trained baseline's weights")
        parser.add_argument("--passport-out", type=Path,
                            help="passport file (default: OUT with suffix .passport.pt)")

    def protect(self, args: argparse.Namespace) -> int:
        from sealnet.data import load_data_from_args
        from sealnet.protect.passport_train import PassportConfig, default_passport_path, protect_passport
        from sealnet.protect.train import TrainConfig

        if args.model not in PASSPORT_MODELS:
            raise InvalidArgument(f"--model {args.model}: {self.user_model_refusal}")
        width = args.width
        if width is not None and (args.model != "resnet18_p" or width < 1):
            raise ValueError(f"--width {width}: only resnet18_p takes a width, a positive channel count")
        data = load_data_from_args(args, seed=args.seed)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        overrides = {k: getattr(args, k) for k in ("fake_weight", "decor_weight", "sign_weight", "lr_schedule",
                                                     "optimizer", "warm_start")
                     if getattr(args, k, None) is not None}
        pcfg = PassportConfig(scheme=args.scheme, passport_type=args.passport_type, passport_fn=args.passport_fn,
                              signature=args.signature, **overrides)
        passport_out = args.passport_out or default_passport_path(args.out)
        ckpt = protect_passport(data, args.out, cfg, pcfg, model_name=args.model,
                                model_config=None if width is None else {"width": width}, baseline=not args.no_baseline,
                                passport_out=passport_out)
        m = ckpt.metrics
        print(f"checkpoint {args.out} (mode 0600: it holds the passports), passport file {passport_out}")
        if "baseline_acc" in m:
            print(f"  baseline  accuracy {m['baseline_acc']:.2%}  (plain counterpart, same recipe)")
        print(f"  passport  accuracy {m['valid_acc']:.2%}  (scheme {args.scheme}, {args.passport_type} passports, "
              f"{'started from the baseline, reparametrised' if m.get('warm_start') else 'trained from scratch'})")
        if "public_acc" in m:
            print(f"  public    accuracy {m['public_acc']:.2%}  (distributed network, no passport)")
        print(f"  signature {'recovered' if m['signature_match'] else 'NOT recovered'} "
              f"({m['signature_bits']} bits; {m['bits_matched']}/{m['designated_bits']} designated channel signs, "
              f"capacity {m['capacity_bits']})")
        if "trigger_acc" in m:
            print(f"  trigger set detected {m['trigger_acc']:.2%} (public branch, black-box)")
        if args.scheme != "v1":
            import torch

            from sealnet.protect.onnx_export import INPUT_NAME, export_onnx
            from sealnet.protect.passport import PublicBranchModel

            onnx_path = args.out.with_suffix(".public.onnx")  # what V2/V3 distribute: no passport needed
            export_onnx(PublicBranchModel(ckpt.build_public_model()), (torch.zeros(1, *ckpt.input_shape),), onnx_path,
                        [INPUT_NAME])
            print(f"  distributed network: {onnx_path} (public gamma/beta; serve it with `sealnet serve --onnx`)")
        return 0

    def example_commands(self, work: Path, seed: int, out: Path) -> list[list[str]]:
        return [["protect", self.name, "--scheme", "v1", "--seed", str(seed), "--out", str(out)]]

    def split(self, ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, options: ExportOptions,
              log: Callable[[str], None]) -> Split:
        return _split(ckpt, data, onnx_path, options.max_raw_acc, log)


def _layer_spec(name: str, layer: torch.nn.Module, index: int, arrays: dict[str, np.ndarray],
                passports: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sealed description of one passport layer: how the trusted module derives its gamma and beta.

    The layer's weight is sealed too (a copy of public weights, not a secret): the trusted module then never
    parses public.onnx, and a swapped public.onnx cannot steer the derived parameters.
    """
    import numpy as np
    import torch

    from sealnet.protect.methods.base import ExportError
    from sealnet.protect.passport import PassportConv2d

    spec: dict[str, Any] = {"layer": name, "gamma": f"gamma_{index}", "beta": f"beta_{index}"}
    if isinstance(layer, PassportConv2d):
        conv = layer.conv
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ExportError(f"passport layer {name}: only plain convolutions (groups 1, dilation 1) are supported")
        spec.update(kind="conv", stride=list(conv.stride), padding=list(conv.padding))
    else:
        spec.update(kind="linear")
    arrays[f"{name}/weight"] = layer.weight().detach().numpy().astype(np.float32)
    for key in ("gamma", "beta"):
        derived = layer.passport_fn in (key, "both")
        spec[f"{key}_from"] = "passport" if derived else "constant"
        source = passports[key] if derived else getattr(layer, key)
        arrays[f"{name}/{key}"] = torch.as_tensor(source).detach().numpy().astype(np.float32)
    return spec


def _split(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
           log: Callable[[str], None]) -> Split:
    """Scheme V1: public.onnx computes gamma*norm(conv(x))+beta with gamma/beta as initializers that ship
    as zeros; the sealed part holds the passports; the trusted module derives gamma/beta after a license check."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from sealnet.onnx_session import ort_accuracy, ort_session, param_names, session_from_model, with_params
    from sealnet.protect.onnx_export import INPUT_NAME, ExportError, check_diff, export_onnx, gate
    from sealnet.protect.passport import ExplicitParamsModel, compute_params, passport_layers

    scheme = ckpt.secret.get("scheme")
    if scheme != "v1":
        raise ExportError(f"passport scheme {scheme!r} is not deployable through the trusted module: V2/V3 "
                          "distribute the public gamma/beta branch, which needs no secret at inference. Export "
                          "scheme v1 (passport needed at inference); verify V2/V3 ownership with `sealnet verify`")
    model = ckpt.build_passport_model()
    layers = passport_layers(model)
    wrapper = ExplicitParamsModel(model).eval()
    params = compute_params(model)
    names = param_names(len(layers))
    values = {n: t.detach().numpy().astype(np.float32)
              for n, t in zip(names, (t for name in layers for t in params[name]), strict=True)}
    example = (torch.zeros(1, *ckpt.input_shape), *(torch.from_numpy(values[n]) for n in names))
    export_onnx(wrapper, example, onnx_path, [INPUT_NAME, *names], fold=False)  # W readable: `verify --bundle`

    # gamma/beta become initializers holding zeros: what ships is a network whose passport layers output 0.
    graph_model = onnx.load(str(onnx_path))
    moved = [i for i in graph_model.graph.input if i.name in values]
    if len(moved) != len(names):
        raise ExportError(f"the exported graph lost passport inputs (found {[i.name for i in moved]})")
    for inp in moved:
        graph_model.graph.input.remove(inp)
        graph_model.graph.initializer.append(numpy_helper.from_array(np.zeros_like(values[inp.name]), inp.name))
    onnx.save(graph_model, str(onnx_path))

    x, y = data.x_test, data.y_test
    with torch.no_grad():
        reference = model(torch.from_numpy(x[:256])).numpy()
    authorized = session_from_model(with_params(graph_model, values))
    diff = check_diff(authorized.run(None, {INPUT_NAME: x[:256]})[0], reference)
    # What a holder of the bundle alone can run: the shipped zeros, or the natural guess gamma=1, beta=0.
    guess = {n: (np.ones_like(v) if n.startswith("gamma") else np.zeros_like(v)) for n, v in values.items()}
    checks = {
        "onnx_max_abs_diff": diff,
        "public_raw_acc": ort_accuracy(ort_session(onnx_path), x, y),
        "public_unit_params_acc": ort_accuracy(session_from_model(with_params(graph_model, guess)), x, y),
        "authorized_acc": ort_accuracy(authorized, x, y),
    }
    log(f"public.onnx: max |onnx - torch| = {diff:.2e}; shipped gamma/beta (zeros) {checks['public_raw_acc']:.1%}, "
        f"gamma=1/beta=0 {checks['public_unit_params_acc']:.1%} (authorized {checks['authorized_acc']:.1%})")
    gate(checks["public_raw_acc"], max_raw_acc, "with the shipped gamma/beta")
    gate(checks["public_unit_params_acc"], max_raw_acc, "with gamma=1, beta=0")

    arrays: dict[str, np.ndarray] = {}
    passports = ckpt.secret["passports"]
    specs = [_layer_spec(name, layer, i, arrays, passports[name]) for i, (name, layer) in enumerate(layers.items())]
    config = {"method": Passport.name, "layers": specs}
    # The passport type and range go into the signed manifest: `sealnet verify --bundle` refuses a claimed random
    # passport outside the range the owner's were drawn from (passports solved for forged gamma/beta are).
    return Split(config, arrays, checks, {"scheme": scheme, "passport_fn": ckpt.secret.get("passport_fn"),
                                          "passport_type": ckpt.secret.get("passport_type"),
                                          "passport_scale": float(ckpt.secret.get("passport_scale", 1.0)),
                                          "passport_params": names})
