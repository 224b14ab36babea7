"""The accelerated public network on a lent NVIDIA machine, in one command (scripts/gpu_check.sh):

1. protect a small model (the Generator transform, 1 epoch) and export it with `--tensorrt` (sealnet's
   public.plan) where TensorRT and a GPU exist;
2. measure the public network at batch 64: sealnet's TensorRT plan, a bare TensorRT engine built from the same
   public.onnx with TensorRT's defaults (no sealnet code), ONNX Runtime's CUDA and TensorRT providers, and ONNX
   Runtime on the CPU.

Every part that needs what this machine lacks is skipped with the reason; on a CPU-only host only the CPU row is
measured. Writes OUT/gpu_check.json and prints a table. Finishes in a few minutes (`--seconds` per row).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


def _sealnet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sealnet", *args], check=True, cwd=ROOT)


def _throughput(run, seconds: float) -> dict:
    """items/s and median latency (ms) of `run()` (one batch of BATCH) over `seconds` after a warm-up."""
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"items_per_s": round(BATCH * len(times) / sum(times), 1), "p50_ms": round(1e3 * float(np.median(times)), 3),
            "runs": len(times)}


def _ort(onnx_path: Path, providers: list, x: np.ndarray, seconds: float) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=providers)
    if session.get_providers()[0] != (providers[0] if isinstance(providers[0], str) else providers[0][0]):
        raise RuntimeError(f"ONNX Runtime fell back to {session.get_providers()}")
    name = session.get_inputs()[0].name
    return _throughput(lambda: session.run(None, {name: x}), seconds)


def _bare_engine(onnx_path: Path, input_shape: tuple[int, ...]) -> bytes:
    """TensorRT's own ONNX parser and builder with default settings and one optimisation profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, *input_shape), (BATCH, *input_shape), (BATCH, *input_shape))
    config.add_optimization_profile(profile)
    return bytes(builder.build_serialized_network(network, config))


def _trt(plan: bytes, input_shape: tuple[int, ...], seconds: float) -> dict:
    """Run a serialized engine on CUDA buffers held by torch (no other CUDA binding needed)."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    context.set_input_shape(inp, (BATCH, *input_shape))
    buffers = {}
    for n in names:
        shape = tuple(context.get_tensor_shape(n))
        buffers[n] = torch.zeros(shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(n, buffers[n].data_ptr())
    stream = torch.cuda.Stream()

    def run() -> None:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    return _throughput(run, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    import onnxruntime as ort

    from sealnet.export.build_engine import tensorrt_available

    trt_reason = tensorrt_available()
    available = ort.get_available_providers()
    print(f"ONNX Runtime providers: {', '.join(available)}; TensorRT: {trt_reason or 'available'}", flush=True)
    _sealnet("protect", "transform", "--epochs", "1", "--no-baseline", "--out", str(out / "protected.pt"))
    _sealnet("license", "keygen", str(out / "owner.key"))
    _sealnet("keystore", "init", str(out / "keystore"))
    _sealnet("export", str(out / "protected.pt"), str(out / "bundle"), "--owner-key", str(out / "owner.key"),
             "--keystore-dir", str(out / "keystore"), "--max-raw-acc", "1.0", *([] if trt_reason else ["--tensorrt"]))
    onnx_path = out / "bundle" / "public.onnx"
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    input_shape = tuple(manifest["input"]["shape"][1:])
    x = np.random.default_rng(0).random((BATCH, *input_shape), dtype=np.float32)
    rows: dict[str, dict] = {}

    def row(name: str, fn, skip: str | None) -> None:
        if skip:
            rows[name] = {"skipped": skip}
            print(f"{name}: skipped ({skip})", flush=True)
            return
        try:
            rows[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others still run
            rows[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {rows[name]}", flush=True)

    no_cuda = None if "CUDAExecutionProvider" in available else "this onnxruntime has no CUDAExecutionProvider"
    no_ort_trt = None if "TensorrtExecutionProvider" in available else "no TensorrtExecutionProvider"
    row("sealnet public.plan (TensorRT)", lambda: _trt((out / "bundle" / "public.plan").read_bytes(), input_shape,
                                                        args.seconds), trt_reason)
    row("bare TensorRT engine (defaults)", lambda: _trt(_bare_engine(onnx_path, input_shape), input_shape,
                                                         args.seconds), trt_reason)
    row("ONNX Runtime, TensorRT provider", lambda: _ort(onnx_path, ["TensorrtExecutionProvider"], x, args.seconds),
        no_ort_trt)
    row("ONNX Runtime, CUDA provider", lambda: _ort(onnx_path, ["CUDAExecutionProvider"], x, args.seconds), no_cuda)
    row("ONNX Runtime, CPU", lambda: _ort(onnx_path, ["CPUExecutionProvider"], x, args.seconds), None)
    report = {"batch": BATCH, "input_shape": list(input_shape), "providers": available,
              "tensorrt": trt_reason or "available", "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\npublic network, batch {BATCH}            items/s      p50 ms")
    for name, r in rows.items():
        value = f"{r['items_per_s']:>10,.0f}  {r['p50_ms']:>10.3f}" if "items_per_s" in r else \
            r.get("skipped") or r.get("failed")
        print(f"{name:<36} {value}")
    print(f"(JSON: {out / 'gpu_check.json'})")
    return 1 if any("failed" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
