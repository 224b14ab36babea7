"""Closed-loop load generator for any KServe v2 gRPC endpoint: C concurrent clients, each sending batch B
requests back to back for a fixed time. One asyncio process, so the client's own cost stays small and the
same for every server under test. Prints one JSON object.

    python -m sealnet.bench.load --target 127.0.0.1:8001 --model M --batch 8 --concurrency 16 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np

from sealnet._grpc import inference_pb2, inference_pb2_grpc
from sealnet.rpc import LICENSE_METADATA


def _request(model: str, input_name: str, shape: list[int], batch: int) -> inference_pb2.ModelInferRequest:
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    req = inference_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="FP32", shape=[batch, *shape])
    req.raw_input_contents.append(x.tobytes())
    return req


async def _client(stub, req, metadata, until: float, warm_until: float, latencies: list[float],
                  errors: list[str]) -> None:
    while True:
        start = time.perf_counter()
        if start >= until:
            return
        try:
            await stub.ModelInfer(req, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            errors.append(exc.code().name)
            continue
        end = time.perf_counter()
        if start >= warm_until:
            latencies.append(end - start)


async def run(target: str, model: str, input_name: str, shape: list[int], batch: int, concurrency: int,
              duration: float, warmup: float, license_token: str | None) -> dict:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    # one channel per client, as independent edge clients would have
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    stubs = [inference_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    req = _request(model, input_name, shape, batch)
    metadata = ((LICENSE_METADATA, license_token),) if license_token else None
    await asyncio.gather(*(s.ModelInfer(req, metadata=metadata, timeout=60) for s in stubs))  # connect + warm
    latencies: list[float] = []
    errors: list[str] = []
    begin = time.perf_counter()
    warm_until, until = begin + warmup, begin + warmup + duration
    await asyncio.gather(*(_client(s, req, metadata, until, warm_until, latencies, errors) for s in stubs))
    for c in channels:
        await c.close()
    lat = np.asarray(latencies) * 1000
    return {
        "batch": batch, "concurrency": concurrency, "requests": len(lat), "errors": len(errors),
        "error_codes": sorted(set(errors)),
        "items_per_s": len(lat) * batch / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def run_in_process(onnx_path: str, shape: list[int], batch: int, duration: float, warmup: float) -> dict:
    """The limit: back-to-back ONNX Runtime calls on one thread of this process, the runtime's session options."""
    from sealnet.onnx_session import ort_session

    session = ort_session(onnx_path, providers=["auto"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    end_warm = time.perf_counter() + warmup
    while time.perf_counter() < end_warm:
        session.run(None, {name: x})
    lat = []
    end = time.perf_counter() + duration
    while (t0 := time.perf_counter()) < end:
        session.run(None, {name: x})
        lat.append(time.perf_counter() - t0)
    ms = np.asarray(lat) * 1000
    return {"batch": batch, "concurrency": 1, "requests": len(ms), "errors": 0, "error_codes": [],
            "items_per_s": len(ms) * batch / duration, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="HOST:PORT of a KServe v2 gRPC endpoint")
    p.add_argument("--onnx", help="instead of --target: run this ONNX file in-process (the limit)")
    p.add_argument("--model", default="")
    p.add_argument("--input-name", default="input")
    p.add_argument("--shape", default="1,28,28", help="item shape, comma separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--license-file", help="send this license token as metadata")
    args = p.parse_args(argv)
    token = open(args.license_file).read().strip() if args.license_file else None
    shape = [int(s) for s in args.shape.split(",")]
    if args.onnx:
        json.dump(run_in_process(args.onnx, shape, args.batch, args.duration, args.warmup), sys.stdout)
        return 0
    if not args.target:
        p.error("pass --target or --onnx")
    result = asyncio.run(run(args.target, args.model, args.input_name, shape, args.batch, args.concurrency,
                             args.duration, args.warmup, token))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
