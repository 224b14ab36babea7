"""The python engine's readiness tells the truth: grpc.health and KServe ServerReady / ModelReady turn false
within 5 s of the trusted module dying, and true again within 5 s of its return (Triton's: tests/test_triton.py)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sealnet.deployment import LocalDeployment
from sealnet.licenses import issue_license
from tests.conftest import MODEL_ID, kserve_infer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _wait(predicate, seconds: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, f"{what} not within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_health_and_readiness_follow_the_trusted_module(artefacts, short_tmp):
    token = issue_license(artefacts["owner_key"], customer_id="acme", model_id=MODEL_ID, serial_number="SN-1",
                          valid_seconds=600)
    x = np.zeros((1, 1, 8, 8), np.float32)
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"],
                         enclave_address=f"unix:{short_tmp / 'r.sock'}") as d:
        channel = grpc.insecure_channel(d.endpoint)
        health = health_pb2_grpc.HealthStub(channel)
        client = triton.InferenceServerClient(d.endpoint)
        try:
            def state():
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                return status, client.is_server_ready(), client.is_model_ready(MODEL_ID)

            assert state() == (SERVING, True, True)
            d.kill_enclave()
            _wait(lambda: state() == (NOT_SERVING, False, False), 5.0, "readiness false after the module died")
            d.start_enclave()
            _wait(lambda: state() == (SERVING, True, True), 5.0, "readiness true after the module returned")
            assert kserve_infer(client, MODEL_ID, x, token).as_numpy("logits").shape == (1, 10)
        finally:
            client.close()
            channel.close()
