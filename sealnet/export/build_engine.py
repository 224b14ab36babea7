"""Build a deployment bundle from a protected checkpoint.

    sealnet export CHECKPOINT OUT_DIR --owner-key KEY --keystore-dir DIR [--tensorrt]

(also `python -m sealnet.export.build_engine`). The bundle holds public.onnx (useless alone; checked here and
recorded), secrets.sealed (the method's secret part, sealed by the keystore to the trusted module's
measurements) and manifest.json (sha256 of every file, signed by the owner key). The per-method part, the
split, is the method's (sealnet/protect/methods/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from sealnet.bundle import (
    EXPECTED_MEASUREMENTS,
    FORMAT,
    MANIFEST,
    PUBLIC_ONNX,
    SECRETS,
    core_digest,
    owner_key_field,
    sha256_file,
    sign_manifest,
)
from sealnet.data import load_dataset
from sealnet.enclave_sim.keystore import KeystoreError
from sealnet.enclave_sim.keystore_spec import KeystoreSpec, keystore_spec
from sealnet.enclave_sim.measure import measurement_chain
from sealnet.enclave_sim.payload import pack
from sealnet.export import ExportError, add_arguments
from sealnet.licenses import LicenseError, load_owner_key
from sealnet.outputs import logits_outputs
from sealnet.protect.checkpoint import ProtectedCheckpoint, load_checkpoint
from sealnet.protect.methods import ExportOptions, exportable, get_method
from sealnet.protect.onnx_export import INPUT_NAME
from sealnet.protect.train import MIN_MARGIN_OVER_CHANCE

PUBLIC_PLAN = "public.plan"


def tensorrt_available() -> str | None:
    """None when a TensorRT engine can be built here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process"
    return None


def build_tensorrt_plan(onnx_path: Path, plan_path: Path, input_shape: tuple[int, ...], max_batch: int,
                        fp16: bool = False) -> None:
    """Parse public.onnx with TensorRT and serialise an engine with a dynamic batch profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = min(64, max_batch)
    profile.set_shape(INPUT_NAME, (1, *input_shape), (opt, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))


def default_model_id(ckpt: ProtectedCheckpoint) -> str:
    return f"{ckpt.model_name}-{get_method(ckpt.method).model_id_suffix(ckpt)}"


def build_bundle(checkpoint: Path, out_dir: Path, *, owner_key: Path, keystore: KeystoreSpec,
                 model_id: str | None = None, data_dir: Path | None = None, max_raw_acc: float = 0.2,
                 max_batch: int = 1024, tensorrt: bool = False, fp16: bool = False, force: bool = False,
                 min_authorized_acc: float | None = None, output_policy: str | None = None,
                 log=print) -> dict[str, Any]:
    """Write a bundle directory and return its manifest. Nothing is left behind on failure.

    `min_authorized_acc` (default: chance + 10 pts) is the floor for the accuracy *with* the secret; only
    timing runs on untrained models lower it."""
    if tensorrt and (reason := tensorrt_available()):
        raise ExportError(f"--tensorrt: cannot build a TensorRT engine here: {reason}. "
                          "Export without --tensorrt to get the ONNX bundle only.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    ckpt = load_checkpoint(checkpoint)
    method = get_method(ckpt.method)
    if method.module_step is None:
        raise ExportError(f"checkpoint method {ckpt.method!r} is not exportable (supported: {', '.join(exportable())})")
    if output_policy is not None and not method.takes_output_policy:
        takes = [name for name in exportable() if get_method(name).takes_output_policy]
        raise ExportError(f"--output-policy applies to {', '.join(takes)} bundles; this checkpoint is {ckpt.method!r}")
    signer = load_owner_key(owner_key)
    data = load_dataset(ckpt.dataset, data_dir, seed=0, options=ckpt.data_config)
    if data.input_shape != ckpt.input_shape:
        raise ExportError(f"dataset {data.name} has input shape {data.input_shape}, checkpoint {ckpt.input_shape}")
    store = keystore.open()

    staging = Path(tempfile.mkdtemp(prefix=".sealnet-export-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        onnx_path = staging / PUBLIC_ONNX
        split = method.split(ckpt, data, onnx_path, ExportOptions(max_raw_acc, output_policy), log)
        checks = {**split.checks, "chance_acc": 1.0 / data.num_classes, "max_raw_acc": max_raw_acc,
                  "dataset": data.name, "test_items": int(len(data.y_test))}
        floor = checks["chance_acc"] + MIN_MARGIN_OVER_CHANCE if min_authorized_acc is None else min_authorized_acc
        if checks["authorized_acc"] < floor:
            raise ExportError(f"the model reaches only {checks['authorized_acc']:.1%} even with its secret (chance "
                              f"{checks['chance_acc']:.0%}): training failed; retrain it (another --seed)")
        files = {PUBLIC_ONNX: sha256_file(onnx_path)}
        if tensorrt:
            build_tensorrt_plan(onnx_path, staging / PUBLIC_PLAN, ckpt.input_shape, max_batch, fp16)
            files[PUBLIC_PLAN] = sha256_file(staging / PUBLIC_PLAN)
        tensor_shape = [-1, *ckpt.input_shape]
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "bundle_id": uuid.uuid4().hex,
            "model_id": model_id or default_model_id(ckpt),
            "method": ckpt.method,
            "module_step": method.module_step,  # what the runtime asks the trusted module for, and when
            **split.manifest,
            "created_at": int(time.time()),
            "owner_public_key": owner_key_field(signer),
            "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": tensor_shape,
                      # how clients turn an image into this tensor (resize, scale to [0, 1], normalise)
                      **({"preprocessing": ckpt.data_config} if ckpt.data_config else {})},
            "outputs": split.outputs or logits_outputs(ckpt.num_classes),
            "max_batch": max_batch,
            "files": files,
            "checks": checks,
            "training": {k: float(v) for k, v in ckpt.metrics.items()},
        }
        measurements, chain = measurement_chain(core_digest(manifest))
        sealed = store.seal(pack(split.config, split.arrays), chain=chain, label=manifest["bundle_id"])
        (staging / SECRETS).write_bytes(sealed)
        expected = {
            "backend": store.backend,
            "attestation_public_key": store.attestation_public_key().hex(),
            "chain": chain.hex(),
            "measurements": [{"name": m.name, "sha256": m.sha256.hex()} for m in measurements],
        }
        (staging / EXPECTED_MEASUREMENTS).write_text(json.dumps(expected, indent=2) + "\n")
        manifest["sealed"] = {SECRETS: sha256_file(staging / SECRETS)}
        manifest["attestation"] = {EXPECTED_MEASUREMENTS: sha256_file(staging / EXPECTED_MEASUREMENTS)}
        manifest = sign_manifest(manifest, signer)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        store.close()
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = build_bundle(args.checkpoint, args.out_dir, owner_key=args.owner_key, keystore=keystore_spec(args),
                            model_id=args.model_id, data_dir=args.data_dir, max_raw_acc=args.max_raw_acc,
                            max_batch=args.max_batch, tensorrt=args.tensorrt, fp16=args.fp16, force=args.force,
                            output_policy=args.output_policy)
    print(f"bundle {args.out_dir}: model {manifest['model_id']}, files {', '.join(manifest['files'])}, "
          f"{SECRETS} sealed, manifest signed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_engine.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ExportError, KeystoreError, LicenseError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
