"""The protected model inside Triton's Python backend (imported by the model.py that `sealnet triton-repo`
writes; runs only in the backend's stub process, where `triton_python_backend_utils` exists).

Triton's dynamic batcher hands `execute` a list of requests; each is checked (license parameter, finite input),
and the valid ones go to sealnet.runtime.pipeline.Pipeline in one call, which groups them per license, calls the
trusted module once per license and the public network once per merged batch, exactly as the python engine
does. `initialize` runs the python engine's own start-up check (the manifest is the one the module measures, the
module attests), so the model, and with
`--strict-readiness` the server, is ready only after the module proved itself; a failed attestation fails the
load and tritonserver exits. Metrics are Triton custom metrics on its metrics endpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import triton_python_backend_utils as pb_utils

from sealnet.bundle import load_bundle
from sealnet.runtime.errors import InternalError, RequestError, ServingError
from sealnet.runtime.identity import TrustedProxies
from sealnet.runtime.pipeline import Pipeline, Request
from sealnet.runtime.server import attested_enclave
from sealnet.runtime.triton.protocol import CODE_MAP, REASONS, credentials, error_message, refusal_reason

log = logging.getLogger("sealnet.triton")

_LATENCY_BUCKETS_US = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000, 1000000]


class Metrics:
    """sealnet's families on Triton's metrics endpoint. Labels are the model name and fixed vocabularies
    (RPC names, refusal reasons): never a license, a customer or a client address."""

    def __init__(self, model: str):
        family = pb_utils.MetricFamily
        self._module = family(name="sealnet_trusted_module_rpc_duration_us", kind=family.HISTOGRAM,
                              description="Trusted-module RPC latency seen by the runtime (microseconds)")
        self._module_errors = family(name="sealnet_trusted_module_rpc_failures_total", kind=family.COUNTER,
                                     description="Trusted-module RPCs that failed, by RPC and gRPC status")
        refusals = family(name="sealnet_refusals_total", kind=family.COUNTER,
                          description="Requests refused by sealnet, by reason (license, lockout, quota, module)")
        items = family(name="sealnet_items_total", kind=family.COUNTER,
                       description="Items answered through the trusted module (what licenses' quotas count)")
        self._families = (self._module, self._module_errors, refusals, items)  # a Metric needs its family alive
        self._model = model
        self._histograms: dict[str, Any] = {}
        self._failures: dict[tuple[str, str], Any] = {}
        self._refusals = {r: refusals.Metric(labels={"model": model, "reason": r}) for r in REASONS}
        self._items = items.Metric(labels={"model": model})

    def module_call(self, rpc: str, seconds: float, code: grpc.StatusCode | None) -> None:
        """EnclaveClient's observer: one observation per RPC."""
        if rpc not in self._histograms:
            self._histograms[rpc] = self._module.Metric(labels={"model": self._model, "rpc": rpc},
                                                        buckets=_LATENCY_BUCKETS_US)
        self._histograms[rpc].observe(seconds * 1e6)
        if code is not None:
            key = (rpc, code.name)
            if key not in self._failures:
                self._failures[key] = self._module_errors.Metric(
                    labels={"model": self._model, "rpc": rpc, "code": code.name})
            self._failures[key].increment(1)

    def refused(self, error: ServingError) -> None:
        self._refusals[refusal_reason(error)].increment(1)

    def answered(self, items: int) -> None:
        self._items.increment(items)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2:
            log.warning("numpy %s in the Python backend: Triton 2.51's stub returns empty output tensors with "
                        "numpy 2; install runtime/triton/requirements-backend.txt (numpy<2)", np.__version__)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        bundle = load_bundle(model_dir / params["bundle"])
        self.metrics = Metrics(args["model_name"])
        self.client_header = params.get("client_header", "x-forwarded-for")
        self.proxies = TrustedProxies(params.get("trusted_proxies", "").split(","))
        tls = params.get("enclave_tls") or None
        enclave = attested_enclave(bundle, params["enclave"], enclave_tls=Path(tls) if tls else None,
                                   attest_timeout=float(params.get("attest_timeout_s", "60")),
                                   observer=self.metrics.module_call)
        network = None
        target = params.get("public_network", "inline")
        if target.startswith("bls:"):
            network = BlsNetwork(target.removeprefix("bls:"), config)
        elif target == "ensemble":  # the module step alone: the ensemble runs the public network beside it
            network = _in_ensemble
        providers = ["auto"] if params.get("providers", "auto") == "auto" else ["CPUExecutionProvider"]
        self.pipeline = Pipeline(bundle, enclave, ort_threads=int(params.get("ort_threads", "0")),
                                 providers=providers, network=network)
        self.input_name = config["input"][0]["name"]  # the bundle's input, or the ensemble's features
        # a module-first step in an ensemble answers the processed input, under its config's output name
        self.processed_name = config["output"][0]["name"] if target == "ensemble" and \
            not self.pipeline.module_last else None
        log.info("sealnet model %s ready: trusted module at %s attested, public network %s", bundle.model_id,
                 params["enclave"], target)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, Request]] = []
        for i, request in enumerate(requests):
            try:
                accepted.append((i, self._parse(request)))
            except ServingError as exc:
                responses[i] = self._refuse(exc)
        if accepted:
            outcomes = self.pipeline.serve([r for _, r in accepted])
            for (i, request), (outputs, error) in zip(accepted, outcomes, strict=True):
                if error is not None:
                    responses[i] = self._refuse(error)
                    continue
                self.metrics.answered(len(request.batch))
                if self.processed_name:
                    outputs = {self.processed_name: next(iter(outputs.values()))}
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()])
        return responses

    def finalize(self) -> None:
        if self.pipeline.enclave is not None:
            self.pipeline.enclave.close()

    def _parse(self, request) -> Request:
        token, client = credentials(request.parameters(), self.client_header, self.proxies)
        batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        if not np.isfinite(batch).all():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[0] ({self.input_name}): contains NaN or "
                               "infinity")
        return Request(token, client, np.ascontiguousarray(batch, dtype="<f4"))

    def _refuse(self, error: ServingError):
        self.metrics.refused(error)
        code = getattr(pb_utils.TritonError, CODE_MAP.get(error.code, "INTERNAL"))
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(error), code))


def _in_ensemble(batch: np.ndarray) -> np.ndarray:
    """The public network's place in the pipeline of an ensemble's module step: Triton runs it as its own model
    before (sealed head: the batch is already its features) or after this step (the processed batch goes on)."""
    return batch


class BlsNetwork:
    """The public network as Triton's own model (`<model>-public`: ONNX Runtime, TensorRT or the Python
    stand-in), called through Business Logic Scripting with the merged batch."""

    def __init__(self, model_name: str, config: dict[str, Any]):
        self.model_name = model_name
        self._input = config["input"][0]["name"]
        self._output: str | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=[pb_utils.Tensor(self._input, batch)], requested_output_names=[],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))  # TensorRT: GPU otherwise
        response = request.exec()
        if response.has_error():
            raise InternalError(f"public network model {self.model_name!r} failed: {response.error().message()}")
        out = response.output_tensors()[0]
        log.debug("BLS %s: %d items in %.2f ms", self.model_name, len(batch), (time.perf_counter() - started) * 1e3)
        return out.as_numpy()
