"""KServe v2 gRPC endpoint (proto/inference.proto): the protocol adapter in front of runtime/pipeline.py.

This module parses and checks requests, hands them to the dynamic batcher and the pipeline (which calls the
trusted module before or after the public network, by method), and turns answers and errors into v2 responses
and gRPC statuses.

The license travels as gRPC request metadata under the key `sealnet-license` (tritonclient:
`client.infer(..., headers={"sealnet-license": token})`). Every answer passes through the trusted module:
when it is unreachable the call fails with UNAVAILABLE; no code path runs the public network on raw inputs.
The server is asyncio gRPC: request parsing stays on one event loop, the trusted-module call and ONNX Runtime
run in worker threads behind the dynamic batcher.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

import sealnet
from sealnet._grpc import inference_pb2, inference_pb2_grpc
from sealnet.bundle import EXPECTED_MEASUREMENTS, PREPROCESS, PUBLIC_ONNX, Bundle, load_bundle
from sealnet.rpc import LICENSE_METADATA, MAX_MESSAGE_BYTES, AsyncErrorInterceptor, add_servicer, clip
from sealnet.runtime.batching import DEFAULT_BATCHING, BatchingConfig, DynamicBatcher
from sealnet.runtime.enclave_client import CallObserver, EnclaveClient
from sealnet.runtime.errors import AttestationFailed, EnclaveError, RequestError
from sealnet.runtime.identity import TrustedProxies, address_identity, parse_address
from sealnet.runtime.pipeline import Pipeline

log = logging.getLogger("sealnet.runtime")

MODEL_VERSION = "1"
READY_POLL_S = 0.5  # how often readiness (grpc.health) re-checks the trusted module
FORWARDED_METADATA = "x-forwarded-for"  # read only from a --trusted-proxy peer
REQUEST_SLACK_BYTES = 64 * 1024  # room for names, shape, parameters beside the largest tensor a request may carry


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """`enclave=None` is the benchmark-only bypass: raw inputs go straight to the public network, which is
    exactly what a pirate gets (near-chance answers), so it exposes nothing; it exists to measure the cost of
    the trusted-module hop. Create it inside the server's event loop (the batcher lives there)."""

    def __init__(self, bundle: Bundle, enclave: EnclaveClient | None, *, ort_threads: int = 0,
                 batching: BatchingConfig | None = DEFAULT_BATCHING, providers: list[str] | None = None,
                 trusted_proxies: TrustedProxies | None = None):
        self.bundle = bundle
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.enclave = enclave
        self.model_id = bundle.model_id
        self.pipeline = Pipeline(bundle, enclave, ort_threads=ort_threads, providers=providers)
        self.input_name = self.pipeline.input_name
        self.item_shape = self.pipeline.item_shape
        self.outputs = self.pipeline.outputs
        self.max_batch = self.pipeline.max_batch
        self.batcher = DynamicBatcher(self.pipeline.serve, batching or BatchingConfig(max_batch=1))
        self._ready_cache = (0.0, False)
        self.port = 0  # set by serve(): the bound TCP port (useful with HOST:0)

    @property
    def max_request_bytes(self) -> int:
        return max_request_bytes(self.max_batch, self.item_shape)

    # -- health and metadata -----------------------------------------------------------------------------
    def enclave_ready(self) -> bool:
        """True when the trusted module answers for this model (cached for one second; blocking)."""
        if self.enclave is None:
            return True
        checked_at, ok = self._ready_cache
        if time.monotonic() - checked_at < READY_POLL_S:
            return ok
        try:
            ok = self.enclave.health().model_id == self.model_id
        except EnclaveError:
            ok = False
        self._ready_cache = (time.monotonic(), ok)
        return ok

    async def _ready(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.enclave_ready)

    async def ServerLive(self, request, context):
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return inference_pb2.ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request, context):
        self._check_model(request.name, request.version)
        return inference_pb2.ModelReadyResponse(ready=await self._ready())

    async def ServerMetadata(self, request, context):
        return inference_pb2.ServerMetadataResponse(name="sealnet", version=sealnet.__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        meta = inference_pb2.ModelMetadataResponse
        return meta(
            name=self.model_id, versions=[MODEL_VERSION], platform="onnxruntime_onnx",
            inputs=[meta.TensorMetadata(name=self.input_name, datatype="FP32", shape=[-1, *self.item_shape])],
            outputs=[meta.TensorMetadata(name=o["name"], datatype=o["datatype"], shape=o["shape"])
                     for o in self.outputs],
        )

    # -- inference ---------------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        """Refusals are raised as ServingError; the server's AsyncErrorInterceptor answers with their status."""
        self._check_model(request.model_name, request.model_version)
        token, forwarded = "", ""
        for key, value in context.invocation_metadata() or ():
            if key == LICENSE_METADATA:
                token = value
            elif key == FORWARDED_METADATA:
                forwarded = value if not forwarded else f"{forwarded},{value}"
        if not token and self.enclave is not None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"metadata '{LICENSE_METADATA}': missing; "
                               "send your license token as request metadata")
        batch = self._input(request)
        names = [o["name"] for o in self.outputs]
        for out in request.outputs:
            if out.name not in names:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"outputs.name: unknown output "
                                   f"{clip(out.name)}; this model has {', '.join(map(repr, names))}")
        client = client_identity(context, self.trusted_proxies, forwarded)
        answer = await self.batcher.submit(token, client, batch, context.time_remaining())
        resp = inference_pb2.ModelInferResponse(model_name=self.model_id, model_version=MODEL_VERSION, id=request.id)
        wanted = {out.name for out in request.outputs} or set(names)
        for spec in self.outputs:
            if spec["name"] in wanted:
                value = answer[spec["name"]]
                resp.outputs.add(name=spec["name"], datatype=spec["datatype"], shape=list(value.shape))
                resp.raw_output_contents.append(value.tobytes())
        return resp

    async def aclose(self) -> None:
        await self.batcher.close()
        if self.enclave is not None:
            self.enclave.close()

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_id:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model_name: unknown model {clip(name)}; this server "
                               f"serves {self.model_id!r}")
        if version not in ("", MODEL_VERSION):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model_version: {clip(version)} not available; use "
                               f"{MODEL_VERSION!r} or leave it empty")

    def _input(self, request) -> np.ndarray:
        """The request's one FP32 tensor. Sizes are checked before anything is converted or echoed: the rank
        before the shape is read, so a shape of millions of dimensions costs nothing."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if len(request.inputs) != 1:
            raise RequestError(bad, f"inputs: expected exactly one tensor named {self.input_name!r}, "
                                    f"got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != self.input_name:
            raise RequestError(bad, f"inputs[0].name: expected {self.input_name!r}, got {clip(tensor.name)}")
        if tensor.datatype != "FP32":
            raise RequestError(bad, f"inputs[0].datatype: expected FP32, got {clip(tensor.datatype)}")
        item = ", ".join(map(str, self.item_shape))
        if len(tensor.shape) != 1 + len(self.item_shape):
            raise RequestError(bad, f"inputs[0].shape: expected [N, {item}], got {len(tensor.shape)} dimensions")
        shape = tuple(tensor.shape)
        if shape[1:] != self.item_shape:
            raise RequestError(bad, f"inputs[0].shape: expected [N, {item}], got {list(shape)}")
        if not 1 <= shape[0] <= self.max_batch:
            raise RequestError(bad, f"inputs[0].shape: batch size must be 1..{self.max_batch}, got {shape[0]}")
        if request.raw_input_contents and tensor.HasField("contents"):
            raise RequestError(bad, "inputs[0].contents: must be empty when raw_input_contents is used; send the "
                                    "tensor in one of them")
        count = int(np.prod(shape))
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise RequestError(bad, "raw_input_contents: expected one entry per input")
            raw = request.raw_input_contents[0]
            if len(raw) != count * 4:
                raise RequestError(bad, f"raw_input_contents[0]: {len(raw)} bytes for shape {list(shape)}, "
                                        f"expected {count * 4} (FP32)")
            batch = np.frombuffer(raw, dtype="<f4").reshape(shape)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise RequestError(bad, f"inputs[0].contents.fp32_contents: {len(values)} values for shape "
                                        f"{list(shape)}, expected {count}")
            batch = np.asarray(values, dtype="<f4").reshape(shape)
        if not np.isfinite(batch).all():
            raise RequestError(bad, "inputs[0]: contains NaN or infinity")
        return batch


def max_request_bytes(max_batch: int, item_shape: tuple[int, ...]) -> int:
    """The largest request gRPC lets through: twice a full batch of FP32 items (fp32_contents may arrive
    unpacked, 5 bytes a value; a batch a little too large still gets INVALID_ARGUMENT naming the batch size) plus
    slack. Anything larger is refused (RESOURCE_EXHAUSTED) before it is parsed, so one huge request cannot hold
    up the event loop."""
    if any(d <= 0 for d in item_shape):  # a bare ONNX model with dynamic dimensions
        return MAX_MESSAGE_BYTES
    return 2 * max_batch * int(np.prod(item_shape)) * 4 + REQUEST_SLACK_BYTES


def client_identity(context, proxies: TrustedProxies | None = None, forwarded: str = "") -> str:
    """The end client as the trusted module should count it for lockout (runtime/identity.py): the peer's
    address (IPv6: its /64), or, when the peer is a trusted proxy, the client its X-Forwarded-For chain names."""
    peer = context.peer() or "unknown"
    if not peer.startswith(("ipv4:", "ipv6:")):
        return peer  # a Unix socket: its callers are this host's
    ip = parse_address(peer.rsplit(":", 1)[0] if peer.startswith("ipv4:") else peer)
    if ip is None:
        return peer.rsplit(":", 1)[0]
    return (proxies or TrustedProxies()).client(ip, forwarded) or address_identity(ip)


def attest_at_start(enclave: EnclaveClient, timeout: float) -> None:
    """Wait for the trusted module and verify it; refuse to start on a mismatch or if it never answers."""
    from sealnet.runtime.attestation import AttestationError

    deadline = time.monotonic() + timeout
    while True:
        try:
            enclave.ensure_attested()
            return
        except AttestationFailed as exc:
            raise AttestationError(f"refusing to serve: {exc}") from None
        except EnclaveError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise AttestationError(f"refusing to serve: trusted module at {enclave.address} did not answer "
                                       f"attestation within {timeout:.0f} s ({exc})") from None
            time.sleep(0.2)


def attested_enclave(bundle: Bundle, enclave_address: str, *, enclave_tls: Path | None = None,
                     expected_measurements: Path | None = None, attest_timeout: float = 60.0,
                     observer: CallObserver | None = None) -> EnclaveClient:
    """Every engine's start-up check: the manifest served is the one the trusted module measures, and the module
    attests against the expected measurements (waiting up to `attest_timeout` for it); AttestationError if not."""
    from sealnet.runtime.attestation import check_manifest_measured, load_expected

    expected = load_expected(expected_measurements or bundle.path(EXPECTED_MEASUREMENTS))
    check_manifest_measured(expected, bundle.manifest)
    enclave = EnclaveClient(enclave_address, tls_dir=enclave_tls, expected=expected, observer=observer)
    attest_at_start(enclave, attest_timeout)
    return enclave


class RuntimeServer:
    """The asyncio gRPC server on its own event-loop thread, with the blocking surface of grpc.Server
    (stop, wait_for_termination) that the CLI and tests use."""

    def __init__(self, make_service, address: str, health_names: tuple[str, ...] = ("",)):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runtime-loop", daemon=True)
        self._thread.start()
        self.service: InferenceService
        self.port = self._call(self._start(make_service, address, health_names))

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, make_service, address: str, health_names: tuple[str, ...]) -> int:
        self.service = make_service()
        self._server = grpc.aio.server(
            interceptors=[AsyncErrorInterceptor()],
            options=[("grpc.max_receive_message_length", self.service.max_request_bytes),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        add_servicer(inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, self.service, self._server)
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        port = self._server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        self._health_task = asyncio.get_running_loop().create_task(self._follow_module(health_servicer,
                                                                                         health_names))
        return port

    async def _follow_module(self, health, names: tuple[str, ...]) -> None:
        """grpc.health says SERVING only while the trusted module answers (checked every READY_POLL_S), as
        ServerReady / ModelReady do: a load balancer stops sending traffic that could only fail."""
        last = None
        while True:
            ok = await self.service._ready()
            if ok != last:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in names:
                    await health.set(name, status)
                if last is not None:
                    log.warning("trusted module %s: readiness now %s", "answers" if ok else "unreachable", ok)
                last = ok
            await asyncio.sleep(READY_POLL_S)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True if `timeout` passed with the server still running (grpc.Server semantics)."""
        if not self._thread.is_alive():
            return False
        try:
            return self._call(self._server.wait_for_termination(timeout))
        except RuntimeError:  # the loop stopped while we waited
            return False

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop serving, close the service and the loop; the returned event is already set."""
        done = threading.Event()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._health_task.cancel)
            self._call(self._server.stop(grace))
            self._call(self.service.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        done.set()
        return done


def serve(bundle_dir: Path, address: str, enclave_address: str | None, *, ort_threads: int = 0,
          enclave_tls: Path | None = None, expected_measurements: Path | None = None, attest_timeout: float = 60.0,
          batching: BatchingConfig | None = DEFAULT_BATCHING, providers: list[str] | None = None,
          owner_public_key: Ed25519PublicKey | None = None, trusted_proxies: TrustedProxies | None = None
          ) -> tuple[RuntimeServer, InferenceService]:
    """Attest the trusted module, then start the endpoint on `address` (HOST:PORT or unix:PATH).

    The manifest must be the one the module measures, and signed by `owner_public_key` when given (the
    owner's key from outside the bundle: then even a whole bundle re-exported by someone else is refused).
    `enclave_address=None` is the benchmark-only bypass (see InferenceService); `batching=None` serves each
    request on its own."""
    bundle = load_bundle(bundle_dir, expected_owner=owner_public_key)
    enclave = None
    if enclave_address is not None:
        enclave = attested_enclave(bundle, enclave_address, enclave_tls=enclave_tls,
                                   expected_measurements=expected_measurements, attest_timeout=attest_timeout)
    else:
        log.warning("BENCHMARK BYPASS: serving the public network on raw inputs without the trusted module "
                    "(answers are near chance; for measuring the trusted module's cost only)")
    server = RuntimeServer(lambda: InferenceService(bundle, enclave, ort_threads=ort_threads, batching=batching,
                                                    providers=providers, trusted_proxies=trusted_proxies), address)
    server.service.port = server.port
    return server, server.service


def unprotected_bundle(onnx_path: Path, model_id: str, max_batch: int = 1024) -> Bundle:
    """An in-memory bundle around a bare ONNX model (one FP32 input with a batch axis, one output)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"--onnx {onnx_path}: no such file")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"--onnx {onnx_path}: expected one input and one output, got {len(inputs)} and "
                         f"{len(graph.output)}")

    def dims(value) -> list[int]:
        return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]

    # No trusted module: the module-first order with enclave=None runs the network on raw inputs.
    manifest = {"model_id": model_id, "method": "unprotected", "module_step": PREPROCESS, "max_batch": max_batch,
                "input": {"name": inputs[0].name, "datatype": "FP32", "shape": [-1, *dims(inputs[0])[1:]]},
                "outputs": [{"name": graph.output[0].name, "datatype": "FP32",
                             "shape": [-1, *dims(graph.output[0])[1:]]}],
                "files": {}}
    return _OnnxOnly(onnx_path.parent, manifest, onnx_path)


@dataclass(frozen=True)
class _OnnxOnly(Bundle):
    onnx_file: Path

    def path(self, name: str) -> Path:
        return self.onnx_file if name == PUBLIC_ONNX else super().path(name)


def serve_unprotected(onnx_path: Path, model_id: str, address: str, *, ort_threads: int = 0
                      ) -> tuple[RuntimeServer, InferenceService]:
    """Serve a bare ONNX model over KServe v2 with no trusted module and no license: what a pirate's (or any
    unprotected) deployment looks like. For ownership checks (`sealnet verify --endpoint`) and experiments."""
    bundle = unprotected_bundle(onnx_path, model_id)
    log.warning("UNPROTECTED: serving %s as %s with no trusted module and no license check", onnx_path, model_id)
    server = RuntimeServer(lambda: InferenceService(bundle, None, ort_threads=ort_threads), address)
    server.service.port = server.port
    return server, server.service

