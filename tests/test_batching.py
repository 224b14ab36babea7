"""Dynamic batching merges concurrent requests without mixing up their answers."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sealnet.deployment import LocalDeployment
from sealnet.licenses import issue_license
from sealnet.runtime import server as runtime_server
from sealnet.runtime.batching import BatchingConfig, DynamicBatcher
from sealnet.runtime.errors import EnclaveError, ServingError
from sealnet.runtime.pipeline import Request, serve_module_first, serve_module_last
from tests.conftest import MODEL_ID


def _fake_module():
    calls: list[tuple[str, int]] = []
    runs: list[int] = []

    def preprocess(token, client, raw):
        calls.append((token, len(raw)))
        if token == "bad":
            raise EnclaveError(grpc.StatusCode.PERMISSION_DENIED, "license: bad")
        if token == "crash":
            raise RuntimeError("a library failed")
        return raw * 2

    def run(x):
        runs.append(len(x))
        return x.reshape(len(x), -1)[:, :3] + 1

    return preprocess, run, calls, runs


def _requests(tokens: list[str], n: int = 9) -> list[Request]:
    """n requests from one end client, cycling through `tokens` (the module is called per license and client)."""
    return [Request(tokens[i % len(tokens)], "c", np.full((1 + i % 2, 1, 2, 2), float(i), np.float32))
            for i in range(n)]


def test_module_first_is_one_call_per_license_and_one_run():
    preprocess, run, calls, runs = _fake_module()
    requests = _requests(["lic0", "lic1", "bad"])
    outcomes = serve_module_first(requests, preprocess, run, "logits")
    assert sorted(t for t, _ in calls) == ["bad", "lic0", "lic1"]
    assert runs == [sum(len(r.batch) for r in requests if r.token != "bad")]
    for r, (out, err) in zip(requests, outcomes, strict=True):
        if r.token == "bad":
            assert out is None and err.code == grpc.StatusCode.PERMISSION_DENIED
        else:
            assert err is None and np.array_equal(out["logits"], r.batch.reshape(len(r.batch), -1)[:, :3] * 2 + 1)


def test_module_last_runs_the_network_once_then_the_module_per_license():
    calls: list[tuple[str, int]] = []
    runs: list[int] = []

    def backbone(x):
        runs.append(len(x))
        return x.reshape(len(x), -1)[:, :3] * 3

    def head(token, client, features):
        calls.append((token, len(features)))
        if token == "bad":
            raise EnclaveError(grpc.StatusCode.PERMISSION_DENIED, "license: bad")
        return {"label": features[:, :1].astype(np.int64) + 1}

    requests = _requests(["lic0", "bad", "lic1"])
    outcomes = serve_module_last(requests, backbone, head)
    assert runs == [sum(len(r.batch) for r in requests)]
    assert sorted(t for t, _ in calls) == ["bad", "lic0", "lic1"]
    for r, (out, err) in zip(requests, outcomes, strict=True):
        if r.token == "bad":
            assert out is None and err.code == grpc.StatusCode.PERMISSION_DENIED
        else:
            want = r.batch.reshape(len(r.batch), -1)[:, :1].astype(np.int64) * 3 + 1
            assert err is None and np.array_equal(out["label"], want)


def test_an_unexpected_error_fails_only_its_license_group():
    preprocess, run, _, _ = _fake_module()
    requests = _requests(["crash", "lic0"], n=4)
    outcomes = serve_module_first(requests, preprocess, run, "logits")
    for r, (out, err) in zip(requests, outcomes, strict=True):
        if r.token == "crash":
            assert out is None and err.code == grpc.StatusCode.INTERNAL and "RuntimeError" in str(err)
            assert "a library failed" not in str(err)  # internal details stay in the server log
        else:
            assert err is None and out["logits"].shape == (len(r.batch), 3)


def test_batcher_merges_concurrent_submissions_and_survives_worker_errors():
    preprocess, run, calls, runs = _fake_module()

    def serve(requests):
        return serve_module_first(requests, preprocess, run, "logits")

    async def main():
        batcher = DynamicBatcher(serve, BatchingConfig(max_batch=64, max_queue_delay_ms=20, workers=1))
        xs = [np.full((1, 1, 2, 2), float(i), np.float32) for i in range(12)]
        outs = await asyncio.gather(*(batcher.submit("lic", f"c{i}", x) for i, x in enumerate(xs)))
        # more failing batches than workers: the worker loop must keep serving
        for _ in range(3):
            with pytest.raises(ServingError):
                await batcher.submit("crash", "c", xs[0])
        after = await batcher.submit("lic", "c", xs[1])
        await batcher.close()
        return xs, outs, after

    xs, outs, after = asyncio.run(main())
    for x, out in zip(xs, outs, strict=True):
        assert np.array_equal(out["logits"], x.reshape(1, -1)[:, :3] * 2 + 1)
    assert np.array_equal(after["logits"], xs[1].reshape(1, -1)[:, :3] * 2 + 1)
    assert len(runs) < 15 and sum(runs) == 13


def test_concurrent_clients_through_the_batching_runtime(artefacts, digits, short_tmp):
    deployment = LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"],
                                 enclave_address=f"unix:{short_tmp / 'b.sock'}", listen="[::]:0",
                                 batching=BatchingConfig(max_batch=32, max_queue_delay_ms=5))
    ckpt = artefacts["checkpoint"]
    model, transform = ckpt.build_public_model(), ckpt.build_transform()
    good = issue_license(artefacts["owner_key"], customer_id="a", model_id=MODEL_ID, serial_number="1",
                         valid_seconds=60)
    bad = issue_license(artefacts["owner_key"], customer_id="a", model_id="other", serial_number="1",
                        valid_seconds=60)
    errors: list[str] = []
    mismatches: list[int] = []

    def worker(i):  # the client with the bad license comes from another address: its failures are its own
        client = triton.InferenceServerClient(f"[::1]:{deployment.port}" if i == 0 else f"127.0.0.1:{deployment.port}")
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
    with deployment:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
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
