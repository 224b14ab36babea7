"""Per-method splits of a protected checkpoint into what the bundle ships and what gets sealed.

Each split writes public.onnx, checks that it is useless alone and right with the secret, and returns the
secret part as (config, arrays) for the trusted module. build_engine.py does the rest (sealing, manifest).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sealnet.data import Dataset
from sealnet.export import ExportError
from sealnet.protect.checkpoint import ProtectedCheckpoint
from sealnet.protect.transform import transform_to_arrays
from sealnet.runtime.onnx_session import ort_accuracy, ort_session, param_names, session_from_model, with_params

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_ONNX_DIFF = 1e-3


@dataclass
class Split:
    config: dict[str, Any]  # sealed: method-specific settings the trusted module needs
    arrays: dict[str, np.ndarray]  # sealed: the secret tensors
    checks: dict[str, Any]  # recorded in the manifest
    manifest: dict[str, Any] = field(default_factory=dict)  # method-specific manifest fields
    outputs: list[dict[str, Any]] | None = None  # the endpoint's output tensors; None: the network's logits


def export_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path | io.BytesIO,
                input_names: list[str], opset: int = 17, fold: bool = True, output_name: str = OUTPUT_NAME) -> None:
    """Export with a dynamic batch dimension on the first input (TorchScript exporter: no extra dependencies).

    `fold=False` keeps every weight under its parameter name (no normalisation folded into convolutions;
    ONNX Runtime fuses them when it loads the graph, so inference costs the same). A BytesIO target keeps the
    graph off the disk (the sealed head)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), args, path if isinstance(path, io.BytesIO) else str(path), dynamo=False,
            opset_version=opset, do_constant_folding=fold, input_names=input_names, output_names=[output_name],
            dynamic_axes={input_names[0]: {0: "batch"}, output_name: {0: "batch"}},
        )


def _check_diff(got: np.ndarray, reference: np.ndarray) -> float:
    diff = float(np.abs(got - reference).max())
    if diff > MAX_ONNX_DIFF:
        raise ExportError(f"ONNX output differs from torch by {diff:.2e} (> {MAX_ONNX_DIFF}); not exporting")
    return diff


def _gate(public_acc: float, max_raw_acc: float, what: str) -> None:
    if public_acc > max_raw_acc:
        raise ExportError(f"the public network reaches {public_acc:.1%} {what} (> --max-raw-acc {max_raw_acc:.0%}): "
                          "it would be useful to a pirate without the trusted module; retrain it")


def _export_public_network(ckpt: ProtectedCheckpoint, data: Dataset, processed: np.ndarray, onnx_path: Path,
                           max_raw_acc: float, log: Callable[[str], None], processed_label: str, raw_gate: str
                           ) -> dict[str, Any]:
    """For methods whose trusted module processes the inputs (transform, DSN stamp): export the checkpoint's
    public network as is, compare it with torch on `processed` (the test split as the module returns it), and
    measure and gate its accuracy on raw inputs."""
    model = ckpt.build_public_model()
    export_onnx(model, (torch.zeros(1, *ckpt.input_shape),), onnx_path, [INPUT_NAME])
    session = ort_session(onnx_path)
    with torch.no_grad():
        reference = model(torch.from_numpy(processed[:256])).numpy()
    diff = _check_diff(session.run(None, {INPUT_NAME: processed[:256]})[0], reference)
    checks = {"onnx_max_abs_diff": diff, "public_raw_acc": ort_accuracy(session, data.x_test, data.y_test),
              "authorized_acc": ort_accuracy(session, processed, data.y_test)}
    log(f"public.onnx: max |onnx - torch| = {diff:.2e}; raw-input accuracy {checks['public_raw_acc']:.1%} "
        f"({processed_label} {checks['authorized_acc']:.1%})")
    _gate(checks["public_raw_acc"], max_raw_acc, raw_gate)
    return checks


def split_transform(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
                    log: Callable[[str], None]) -> Split:
    """Anti-piracy transform: public.onnx is the network trained on transformed inputs; the transform is sealed."""
    transform = ckpt.build_transform()
    with torch.no_grad():
        processed = transform(torch.from_numpy(data.x_test)).numpy()
    checks = _export_public_network(ckpt, data, processed, onnx_path, max_raw_acc, log, "authorized", "on raw inputs")
    config, arrays = transform_to_arrays(transform, ckpt.input_shape)
    return Split(config, arrays, checks, {"variant": ckpt.secret["variant"]})


# -- passports (scheme V1) ------------------------------------------------------------------------------------
def _layer_spec(name: str, layer: torch.nn.Module, index: int, arrays: dict[str, np.ndarray],
                passports: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sealed description of one passport layer: how the trusted module derives its gamma and beta.

    The layer's weight is sealed too (a copy of public weights, not a secret): the trusted module then never
    parses public.onnx, and a swapped public.onnx cannot steer the derived parameters.
    """
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


def split_passport(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
                   log: Callable[[str], None]) -> Split:
    """Scheme V1: public.onnx computes gamma*norm(conv(x))+beta with gamma/beta as initializers that ship
    as zeros; the sealed part holds the passports; the trusted module derives gamma/beta after a license check."""
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
    diff = _check_diff(authorized.run(None, {INPUT_NAME: x[:256]})[0], reference)
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
    _gate(checks["public_raw_acc"], max_raw_acc, "with the shipped gamma/beta")
    _gate(checks["public_unit_params_acc"], max_raw_acc, "with gamma=1, beta=0")

    arrays: dict[str, np.ndarray] = {}
    passports = ckpt.secret["passports"]
    specs = [_layer_spec(name, layer, i, arrays, passports[name]) for i, (name, layer) in enumerate(layers.items())]
    config = {"method": "passport", "layers": specs}
    # The passport type and range go into the signed manifest: `sealnet verify --bundle` refuses a claimed random
    # passport outside the range the owner's were drawn from (passports solved for forged gamma/beta are).
    return Split(config, arrays, checks, {"scheme": scheme, "passport_fn": ckpt.secret.get("passport_fn"),
                                          "passport_type": ckpt.secret.get("passport_type"),
                                          "passport_scale": float(ckpt.secret.get("passport_scale", 1.0)),
                                          "passport_params": names})


# -- Deep Serial Number ----------------------------------------------------------------------------------------
def split_dsn(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
              log: Callable[[str], None]) -> Split:
    """DSN: public.onnx is one customer's student; the sealed part is its stamp (pattern, position, scale) and
    the serial number and customer id a license must carry for the trusted module to stamp inputs."""
    from sealnet.serial import license_serial_number
    from sealnet.stamp import StampSpec

    spec = StampSpec.from_secret(ckpt.secret)
    checks = _export_public_network(ckpt, data, spec.apply(data.x_test), onnx_path, max_raw_acc, log,
                                    "stamped with the serial number", "on raw (unstamped) inputs")
    serial = ckpt.secret["serial"]
    serial_number = license_serial_number(ckpt.secret["commitment"])
    config = {"method": "dsn", "position": list(spec.position), "scale": spec.scale,
              "customer_id": serial["customer_id"], "serial_number": serial_number}
    arrays = {"pattern": spec.pattern.astype(np.float32)}
    return Split(config, arrays, checks, {"customer_id": serial["customer_id"], "serial_number": serial_number})


# -- sealed head ------------------------------------------------------------------------------------------------
FEATURES_NAME = "features"


def _published_weights_check(onnx_path: Path, state: dict[str, torch.Tensor], digest: str) -> None:
    """public.onnx must hold exactly the published backbone's weights and no other weight: recompute the
    published digest from its initializers, and refuse any other floating-point tensor in the graph."""
    from sealnet.protect.backbones import backbone_digest

    if backbone_digest(state) != digest:
        raise ExportError("the checkpoint's backbone weights differ from the published backbone they name "
                          f"(sha256 {digest[:16]}...); re-run `sealnet protect` with the published weights file")
    graph = onnx.load(str(onnx_path)).graph
    shipped = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shipped.update({f"constant:{n.output[0]}": numpy_helper.to_array(a.t) for n in graph.node
                    if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    rebuilt = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        value = shipped.get(name)
        if value is None:  # the exporter keeps one copy of equal tensors (e.g. fresh BatchNorm ones) under one name
            value = next((shipped[other] for other in state if other in shipped
                          and shipped[other].shape == tuple(tensor.shape)
                          and np.array_equal(shipped[other], tensor.numpy())), None)
        if value is None:
            raise ExportError(f"public.onnx does not hold the backbone weight {name!r}")
        rebuilt[name] = torch.from_numpy(np.array(value, dtype=tensor.numpy().dtype, copy=True))
    if backbone_digest(rebuilt) != digest:
        raise ExportError("public.onnx weights differ from the published backbone's (sha256 mismatch); not exporting")
    extra = sorted(n for n, a in shipped.items() if n not in state and a.dtype.kind == "f" and a.size > 1)
    if extra:
        raise ExportError(f"public.onnx carries tensors that are not published backbone weights: {extra[:5]}")


def split_sealed_head(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
                      log: Callable[[str], None]) -> Split:
    """Sealed head: public.onnx is the published backbone exactly as given (features out); the head, trained on
    the owner's data, is sealed as an ONNX graph that only the trusted module runs, under an output policy."""
    from sealnet.outputs import DEFAULT_POLICY, parse_policy, policy_outputs

    policy = parse_policy(ckpt.secret.get("output_policy", DEFAULT_POLICY), ckpt.num_classes)
    backbone, head = ckpt.build_public_model(), ckpt.build_head()
    export_onnx(backbone, (torch.zeros(1, *ckpt.input_shape),), onnx_path, [INPUT_NAME], fold=False,
                output_name=FEATURES_NAME)
    digest = ckpt.secret["backbone_sha256"]
    _published_weights_check(onnx_path, ckpt.public_state, digest)
    with torch.no_grad():
        features = backbone(torch.zeros(1, *ckpt.input_shape))
    buffer = io.BytesIO()
    export_onnx(head, (features,), buffer, [FEATURES_NAME])
    head_bytes = buffer.getvalue()

    public, sealed = ort_session(onnx_path), ort_session(head_bytes)
    x, y = data.x_test, data.y_test
    feats = np.concatenate([public.run(None, {INPUT_NAME: x[i : i + 500]})[0] for i in range(0, len(x), 500)])
    logits = sealed.run(None, {FEATURES_NAME: feats})[0]
    with torch.no_grad():
        reference = head(backbone(torch.from_numpy(x[:256]))).numpy()
    checks = {"onnx_max_abs_diff": _check_diff(logits[:256], reference),
              "public_raw_acc": ort_accuracy(public, x, y),  # the backbone's features read as class scores
              "authorized_acc": float((logits.argmax(1) == y).mean()),
              "backbone_sha256": digest, "num_features": int(feats.shape[1]),
              **{k: ckpt.metrics[k] for k in ("baseline_acc", "backbone_flops", "head_flops", "flops_ratio")
                 if k in ckpt.metrics}}
    log(f"public.onnx: the published backbone, weights verified (sha256 {digest[:16]}...); head sealed "
        f"({len(head_bytes):,} bytes of ONNX); max |onnx - torch| = {checks['onnx_max_abs_diff']:.2e}; "
        f"authorized {checks['authorized_acc']:.1%}; output policy {policy}")
    config = {"method": "sealed-head", "policy": str(policy), "num_classes": ckpt.num_classes,
              "num_features": int(feats.shape[1])}
    arrays = {"head_onnx": np.frombuffer(head_bytes, dtype=np.uint8).copy()}
    manifest = {"output_policy": str(policy),
                "backbone": {"arch": ckpt.model_name, "sha256": digest, "num_features": int(feats.shape[1])}}
    return Split(config, arrays, checks, manifest, outputs=policy_outputs(policy, ckpt.num_classes))


SPLITS = {"transform": split_transform, "passport": split_passport, "dsn": split_dsn,
          "sealed-head": split_sealed_head}
