"""`sealnet triton-repo`: a Triton model repository for one bundle.

    OUT/<model_id>/config.pbtxt           the protected model (Python backend, dynamic batching)
    OUT/<model_id>/1/model.py             a pointer to sealnet.runtime.triton.backend: the runtime's own pipeline
    OUT/<model_id>/bundle/                a copy of the bundle (manifest, public.onnx, sealed secrets, measurements)
    with --network ensemble (the public network on Triton's own backend, only the module step in Python):
    OUT/<model_id>/config.pbtxt           an ensemble with the bundle's input and outputs (clients do not change):
                                          <model_id>-module -> <model_id>-public (transform, DSN stamp), or
                                          <model_id>-public -> <model_id>-module (sealed head)
    OUT/<model_id>-module/                the trusted module's step alone (Python backend; bundle/ as above)
    OUT/<model_id>-public/                with --network bls or ensemble: the public network as its own model,
        config.pbtxt                      a Python-backend ONNX Runtime stand-in (the pip tritonserver has no
                                          other backend),
        configs/onnxruntime.pbtxt         Triton's onnxruntime_onnx backend (NVIDIA's containers), and
        configs/tensorrt.pbtxt            tensorrt_plan (needs 1/model.plan: `sealnet export --tensorrt`);
                                          pick one with `tritonserver --model-config-name onnxruntime|tensorrt`.

The protected model reads the license from the request parameter that `--grpc-header-forward-pattern` /
`--http-header-forward-pattern` make of the `sealnet-license` header, attests the trusted module before it
reports ready, and answers only through it (runtime/pipeline.py, as `sealnet serve --engine python`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealnet.bundle import CLASSIFY, PARAMS, PUBLIC_ONNX, Bundle, load_bundle

PUBLIC_SUFFIX = "-public"
MODULE_SUFFIX = "-module"
NETWORKS = ("inline", "bls", "ensemble")
PROCESSED = "processed"  # the ensemble's tensor between a module-first step and the public network
FEATURES = "features"  # ... between the public network and a module-last step (a sealed head)
PLAN_FILE = "public.plan"
_TRITON_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64"}
_PROTECTED_MODEL_PY = '''"""sealnet's protected model: the code is sealnet.runtime.triton.backend, the same pipeline
as `sealnet serve --engine python`; this file only points Triton's Python backend at it."""

from sealnet.runtime.triton.backend import TritonPythonModel  # noqa: F401
'''
_PUBLIC_MODEL_PY = '''"""The public network on ONNX Runtime in Triton's Python backend (for a tritonserver without the
onnxruntime backend); the code is sealnet.runtime.triton.public."""

from sealnet.runtime.triton.public import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepoOptions:
    enclave: str  # the trusted module: unix:PATH, or HOST:PORT with enclave_tls
    enclave_tls: Path | None = None
    network: str = "inline"  # "inline": ONNX Runtime inside the protected model; "bls" / "ensemble": the public
    # model, called from the protected model, or wired to the module step in a Triton ensemble
    max_batch_size: int | None = None  # None: the bundle's max_batch (the python engine's per-request limit)
    max_queue_delay_us: int = 0  # dynamic batching: how long a request may wait for company
    instances: int = 1  # copies of the protected model (one Python stub process each)
    ort_threads: int = 0  # ONNX Runtime intra-op threads (0: ONNX Runtime's default)
    attest_timeout_s: float = 60.0
    client_header: str = "x-forwarded-for"  # forwarded header naming the end client (lockout identity)
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose forwarded header counts (none: the header is ignored)
    providers: str = "auto"  # ONNX Runtime: "auto" (TensorRT / CUDA when present) or "cpu"
    public_instances: int = 1  # copies of the public model (Triton's onnxruntime backend: one session each)
    accelerator: str = "none"  # "tensorrt": the onnxruntime backend's TensorRT execution provider on a GPU


def _dims(shape: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _tensor(name: str, datatype: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {_TRITON_TYPES[datatype]} dims: {_dims(dims)} }}'


def _parameters(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())


def _io(inputs: list[str], outputs: list[str]) -> str:
    return "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"


def _outputs(manifest: dict[str, Any]) -> list[str]:
    """The bundle's output tensors (the manifest's `outputs`) as config entries."""
    return [_tensor(o["name"], o["datatype"], o["shape"][1:]) for o in manifest["outputs"]]


def _batching(max_queue_delay_us: int) -> str:
    return f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}\n"


def protected_config(manifest: dict[str, Any], options: RepoOptions, public_model: str | None, *,
                     module_io: tuple[list[str], list[str]] | None = None, name: str | None = None) -> str:
    """config.pbtxt of the protected model: the bundle's input and `outputs`, the pipeline's settings; with
    `module_io` (inputs, outputs) the ensemble's module step alone, called `name`."""
    max_batch = options.max_batch_size or int(manifest.get("max_batch", 1024))
    inp = manifest["input"]
    outputs = _outputs(manifest)
    inputs = [_tensor(inp["name"], "FP32", inp["shape"][1:])]
    if module_io is not None:
        inputs, outputs = module_io
    params = {
        "bundle": "bundle",
        "enclave": options.enclave,
        "enclave_tls": str(Path(options.enclave_tls).resolve()) if options.enclave_tls else "",
        "attest_timeout_s": f"{options.attest_timeout_s:g}",
        "public_network": "ensemble" if module_io else f"bls:{public_model}" if public_model else "inline",
        "ort_threads": str(options.ort_threads),
        "providers": options.providers,
        "client_header": options.client_header.lower(),
        "trusted_proxies": ",".join(options.trusted_proxies),
    }
    return (f'name: "{name or manifest["model_id"]}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + _io(inputs, outputs)
            + _batching(options.max_queue_delay_us)
            + f"instance_group [ {{ kind: KIND_CPU count: {options.instances} }} ]\n"
            + _parameters(params) + "\n")


def public_io(onnx_path: Path) -> tuple[tuple[str, list[int]], tuple[str, list[int]]]:
    """(input name, item dims) and (first output name, item dims) of an ONNX network with a batch axis."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in initializers)

    def dims(value) -> list[int]:
        return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim][1:]

    return (inp.name, dims(inp)), (graph.output[0].name, dims(graph.output[0]))


def _ort_settings(options: RepoOptions) -> str:
    """The onnxruntime backend's thread settings and, with --accelerator tensorrt, its TensorRT provider."""
    text = ""
    if options.ort_threads:
        text += _parameters({"intra_op_thread_count": str(options.ort_threads), "inter_op_thread_count": "1"}) + "\n"
    if options.accelerator == "tensorrt":
        text += ('optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" '
                 'parameters { key: "precision_mode" value: "FP32" } } ] } }\n')
    return text


def ensemble_config(manifest: dict[str, Any], options: RepoOptions, public: str, module: str,
                    public_io_names: tuple[str, str]) -> str:
    """The ensemble under the bundle's model id: the module step and the public network in the bundle's order,
    with the bundle's input and outputs, so clients send and receive exactly what they did."""
    max_batch = options.max_batch_size or int(manifest.get("max_batch", 1024))
    inp = manifest["input"]
    outputs = _outputs(manifest)
    pub_in, pub_out = public_io_names

    def step(model: str, inputs: dict[str, str], outs: dict[str, str]) -> str:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
        return f'  {{ model_name: "{model}" model_version: -1{maps} }}'

    if manifest["module_step"] == CLASSIFY:
        steps = [step(public, {pub_in: inp["name"]}, {pub_out: FEATURES}),
                 step(module, {FEATURES: FEATURES}, {o["name"]: o["name"] for o in manifest["outputs"]})]
    else:
        steps = [step(module, {inp["name"]: inp["name"]}, {PROCESSED: PROCESSED}),
                 step(public, {pub_in: PROCESSED}, {pub_out: manifest["outputs"][0]["name"]})]
    return (f'name: "{manifest["model_id"]}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            + _io([_tensor(inp["name"], "FP32", inp["shape"][1:])], outputs)
            + "ensemble_scheduling { step [\n" + ",\n".join(steps) + "\n] }\n")


def public_configs(name: str, onnx_path: Path, max_batch: int, options: RepoOptions) -> dict[str, str]:
    """config.pbtxt (Python-backend ONNX Runtime) and the onnxruntime_onnx / tensorrt_plan variants."""
    (in_name, in_dims), (out_name, out_dims) = public_io(onnx_path)
    io = _io([_tensor(in_name, "FP32", in_dims)], [_tensor(out_name, "FP32", out_dims)])
    head = f'name: "{name}"\n'
    common = f"max_batch_size: {max_batch}\n" + io + _batching(options.max_queue_delay_us)
    return {
        "config.pbtxt": head + 'backend: "python"\n' + common
        + f"instance_group [ {{ kind: KIND_CPU count: {options.public_instances} }} ]\n"
        + _parameters({"ort_threads": str(options.ort_threads), "providers": options.providers}) + "\n",
        "configs/onnxruntime.pbtxt": head + 'backend: "onnxruntime"\n' + common
        + f"instance_group [ {{ kind: KIND_AUTO count: {options.public_instances} }} ]\n"
        + _ort_settings(options),
        "configs/tensorrt.pbtxt": head + 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n' + common
        + "instance_group [ { kind: KIND_GPU count: 1 } ]\n",
    }


def write_repository(bundle_dir: Path, out: Path, options: RepoOptions, *, force: bool = False,
                     expected_owner: Ed25519PublicKey | None = None) -> list[Path]:
    """Write (or add to) a Triton model repository at `out`; returns the model directories written.
    `expected_owner`: refuse a bundle not signed by this owner key (as `serve --owner-public-key`)."""
    bundle: Bundle = load_bundle(bundle_dir, expected_owner=expected_owner)
    manifest = bundle.manifest
    if options.network not in NETWORKS:
        raise ValueError(f"--network {options.network!r}: expected one of {', '.join(NETWORKS)}")
    if options.network != "inline" and manifest["module_step"] == PARAMS:
        raise ValueError(f"--network {options.network}: a {manifest['method']} bundle's public network gets its "
                         "weights from the trusted module per session, so it runs inside the protected model; use "
                         "--network inline")
    if not options.enclave.startswith("unix:") and options.enclave_tls is None:
        raise ValueError(f"--enclave {options.enclave}: TCP requires mTLS; pass --enclave-tls")
    model_id = bundle.model_id
    public = model_id + PUBLIC_SUFFIX if options.network != "inline" else None
    module = model_id + MODULE_SUFFIX if options.network == "ensemble" else None
    dirs = [out / model_id] + ([out / public] if public else []) + ([out / module] if module else [])
    for d in dirs:
        if d.exists():
            if not force:
                raise FileExistsError(f"{d} exists; pass --force to replace it")
            shutil.rmtree(d)
    if module:
        _write_ensemble(bundle, out, options, public, module)
    else:
        _write_protected_model(out / model_id, bundle, protected_config(manifest, options, public))
    if public:
        max_batch = options.max_batch_size or int(manifest.get("max_batch", 1024))
        (out / public / "1").mkdir(parents=True)
        (out / public / "configs").mkdir()
        shutil.copyfile(bundle.path(PUBLIC_ONNX), out / public / "1" / "model.onnx")
        if bundle.path(PLAN_FILE).is_file():
            shutil.copyfile(bundle.path(PLAN_FILE), out / public / "1" / "model.plan")
        (out / public / "1" / "model.py").write_text(_PUBLIC_MODEL_PY)
        for rel, text in public_configs(public, bundle.path(PUBLIC_ONNX), max_batch, options).items():
            (out / public / rel).write_text(text)
    return dirs


def _write_ensemble(bundle: Bundle, out: Path, options: RepoOptions, public: str, module: str) -> None:
    """The ensemble under the model id and its module step (the public model is written by the caller)."""
    manifest = bundle.manifest
    (in_name, in_dims), (out_name, out_dims) = public_io(bundle.path(PUBLIC_ONNX))
    inp = manifest["input"]
    if manifest["module_step"] == CLASSIFY:
        io = ([_tensor(FEATURES, "FP32", out_dims)],
              _outputs(manifest))
    else:
        io = ([_tensor(inp["name"], "FP32", inp["shape"][1:])], [_tensor(PROCESSED, "FP32", in_dims)])
    _write_protected_model(out / module, bundle, protected_config(manifest, options, None, module_io=io,
                                                                   name=module))
    (out / bundle.model_id / "1").mkdir(parents=True)  # an ensemble has a version directory and no files
    (out / bundle.model_id / "config.pbtxt").write_text(ensemble_config(manifest, options, public, module,
                                                                         (in_name, out_name)))


def _write_protected_model(directory: Path, bundle: Bundle, config: str) -> None:
    """A model sealnet's backend serves (the protected model, or an ensemble's module step): its config, the
    one-line model.py and a copy of the bundle."""
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.py").write_text(_PROTECTED_MODEL_PY)
    shutil.copytree(bundle.directory, directory / "bundle")
    (directory / "config.pbtxt").write_text(config)
