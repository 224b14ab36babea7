"""Dynamic batching merges concurrent requests without mixing up their answers."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from enclave_sim import service as enclave_service
from runtime import server as runtime_server
from runtime.batching import BatchingConfig, DynamicBatcher, process_group
from runtime.enclave_client import EnclaveError
from sealnet.licenses import issue_license
from tests.conftest import MODEL_ID


def _fake_module():
    calls: list[tuple[str, int]] = []
    runs: list[int] = []

    def preprocess(token, client, raw):
        calls.append((token, len(raw)))
        if token == "bad":
            raise EnclaveError(grpc.StatusCode.PERMISSION_DENIED, "license: bad")
        return raw * 2

    def run(x):
        runs.append(len(x))
        return x.reshape(len(x), -1)[:, :3] + 1

    return preprocess, run, calls, runs


def test_merged_group_is_one_call_per_license_and_one_run():
    preprocess, run, calls, runs = _fake_module()
    requests = [(["lic0", "lic1", "bad"][i % 3], f"c{i}", np.full((1 + i % 2, 1, 2, 2), float(i), np.float32))
                for i in range(9)]
    outcomes = process_group(preprocess, run, requests)
    assert sorted(t for t, _ in calls) == ["bad", "lic0", "lic1"] and runs == [sum(1 + i % 2 for i in range(9)
                                                                                  if i % 3 != 2)]
    for (token, _, x), (out, err) in zip(requests, outcomes, strict=True):
        if token == "bad":
            assert out is None and err.code == grpc.StatusCode.PERMISSION_DENIED
        else:
            assert err is None and np.array_equal(out, x.reshape(len(x), -1)[:, :3] * 2 + 1)


def test_batcher_merges_concurrent_submissions():
    preprocess, run, calls, runs = _fake_module()

    async def main():
        batcher = DynamicBatcher(preprocess, run, BatchingConfig(max_batch=64, max_queue_delay_ms=20, workers=1))
        xs = [np.full((1, 1, 2, 2), float(i), np.float32) for i in range(12)]
        outs = await asyncio.gather(*(batcher.submit("lic", f"c{i}", x) for i, x in enumerate(xs)))
        await batcher.close()
        return xs, outs

    xs, outs = asyncio.run(main())
    for x, out in zip(xs, outs, strict=True):
        assert np.array_equal(out, x.reshape(1, -1)[:, :3] * 2 + 1)
    assert len(runs) < 12 and sum(runs) == 12


def test_concurrent_clients_through_the_batching_runtime(artefacts, digits, short_tmp):
    addr = f"unix:{short_tmp / 'b.sock'}"
    enclave, module = enclave_service.serve(artefacts["bundle"], addr, artefacts["keystore"])
    server, service = runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", addr,
                                           batching=BatchingConfig(max_batch=32, max_queue_delay_ms=5))
    ckpt = artefacts["checkpoint"]
    model, transform = ckpt.build_public_model(), ckpt.build_transform()
    good = issue_license(artefacts["owner_key"], customer_id="a", model_id=MODEL_ID, serial_number="1",
                         valid_seconds=60)
    bad = issue_license(artefacts["owner_key"], customer_id="a", model_id="other", serial_number="1",
                        valid_seconds=60)
    errors: list[str] = []
    mismatches: list[int] = []

    def worker(i):
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        for j in range(10):
            x = digits.x_test[(i * 10 + j) % 300 :][:1 + j % 3]
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                out = client.infer(MODEL_ID, [inp], headers={"sealnet-license": bad if i == 0 else good})
            except InferenceServerException as exc:
                errors.append(exc.status())
                continue
            with torch.no_grad():
                want = model(transform(torch.from_numpy(x))).numpy()
            if np.abs(out.as_numpy("logits") - want).max() > 1e-3:
                mismatches.append(i)
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop(0)
        enclave.stop(0)
        module.close()
    assert not mismatches
    assert errors == ["StatusCode.PERMISSION_DENIED"] * 10


def test_benchmark_bypass_serves_raw_inputs_only(artefacts, digits):
    """The measurement-only bypass gives exactly what a pirate gets: the public network on raw inputs."""
    server, service = runtime_server.serve(artefacts["bundle"], "127.0.0.1:0", None)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
        x = digits.x_test[:64]
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer(MODEL_ID, [inp]).as_numpy("logits")
        client.close()
    finally:
        server.stop(0)
    model = artefacts["checkpoint"].build_public_model()
    with torch.no_grad():
        assert np.abs(out - model(torch.from_numpy(x)).numpy()).max() < 1e-3
    assert (out.argmax(1) == digits.y_test[:64]).mean() <= 0.4  # useless answers: nothing protected leaks
