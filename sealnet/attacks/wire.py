"""Raw gRPC access to both services for the protocol attacks: bytes in, status and bytes out.

Requests go through a generic `channel.unary_unary` with identity (de)serializers, so the suite can send any
byte string (mutated, truncated, random) to the servers' protobuf parsers, not just well-formed messages.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from sealnet._grpc import enclave_pb2, inference_pb2
from sealnet.rpc import CLIENT_METADATA, LICENSE_METADATA
from sealnet.runtime.enclave_client import channel_target, client_credentials

RUNTIME_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ENCLAVE_SERVICE = enclave_pb2.DESCRIPTOR.services_by_name["TrustedModule"].full_name
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
DEADLINE_S = 10.0  # a call without an answer by then counts as a hang
# Statuses a server may refuse a bad request with; anything else (UNKNOWN: an exception escaped a handler,
# UNAVAILABLE: the server died, DEADLINE_EXCEEDED: a hang) is a finding.
REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.OUT_OF_RANGE})


def open_channel(address: str, tls_dir: Path | None = None) -> grpc.Channel:
    """A channel that may send more than the servers accept (to test their limits) and read their answers."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 256 << 20),
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
    target = channel_target(address)
    if tls_dir is not None:
        return grpc.secure_channel(target, client_credentials(tls_dir), options=options)
    return grpc.insecure_channel(target, options=options)


def method(service: str, name: str) -> str:
    return f"/{service}/{name}"


@dataclass
class Reply:
    code: grpc.StatusCode
    details: str
    body: bytes | None = field(default=None, repr=False)


def is_parser_refusal(reply: Reply) -> bool:
    """A refusal of bytes that do not parse as the request message: sealnet's services answer INVALID_ARGUMENT
    "request: not a valid ... message"; stock gRPC servers answer INTERNAL "Exception deserializing request!"
    (sync) or UNKNOWN naming the DecodeError (asyncio)."""
    text = reply.details.lower()
    if reply.code == grpc.StatusCode.INVALID_ARGUMENT:
        return text.startswith("request: not a valid")
    return reply.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        marker in text for marker in ("deserializ", "error parsing message", "decodeerror"))


def classify(reply: Reply, ok_allowed: bool) -> str:
    """'ok', 'refused' or 'parser' (expected refusals), or a finding: 'unprotected', 'hang', 'crash',
    'unhandled' (an exception escaped a handler)."""
    if reply.code == grpc.StatusCode.OK:
        return "ok" if ok_allowed else "unprotected"
    if is_parser_refusal(reply):
        return "parser"
    if reply.code in REFUSALS:
        return "refused"
    if reply.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "hang"
    if reply.code == grpc.StatusCode.UNAVAILABLE:
        return "crash"
    return "unhandled"


class Wire:
    """Bytes-level calls on one channel; `future` lets the fuzzer keep several requests in flight."""

    def __init__(self, address: str, tls_dir: Path | None = None):
        self.address = address
        self.channel = open_channel(address, tls_dir)
        self._callables: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def _callable(self, path: str) -> grpc.UnaryUnaryMultiCallable:
        if path not in self._callables:
            self._callables[path] = self.channel.unary_unary(path, request_serializer=None,
                                                             response_deserializer=None)
        return self._callables[path]

    def call(self, path: str, body: bytes, metadata: list[tuple[str, str]] | None = None,
             timeout: float = DEADLINE_S) -> Reply:
        try:
            return Reply(grpc.StatusCode.OK, "", self._callable(path)(body, timeout=timeout, metadata=metadata))
        except grpc.RpcError as exc:
            return Reply(exc.code(), exc.details() or "")

    def future(self, path: str, body: bytes, metadata: list[tuple[str, str]] | None = None,
               timeout: float = DEADLINE_S) -> grpc.Future:
        return self._callable(path).future(body, timeout=timeout, metadata=metadata)

    def close(self) -> None:
        self.channel.close()


def reply_of(fut: grpc.Future) -> Reply:
    try:
        return Reply(grpc.StatusCode.OK, "", fut.result())
    except grpc.RpcError as exc:
        return Reply(exc.code(), exc.details() or "")


def license_md(token: str | None) -> list[tuple[str, str]] | None:
    return [(LICENSE_METADATA, token)] if token else None


def client_md(label: str) -> list[tuple[str, str]]:
    """A fresh forwarded client identity: direct callers of the trusted module may choose it (A2 can), so each
    probe gets its own and one probe's lockout does not leak into the next."""
    return [(CLIENT_METADATA, f"attack-{label}-{secrets.token_hex(4)}")]


def infer_request(model: str, x: np.ndarray, *, name: str = "input", datatype: str = "FP32",
                  shape: list[int] | None = None, raw: bytes | None = None) -> inference_pb2.ModelInferRequest:
    req = inference_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes() if raw is None else raw)
    return req


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def huge_shape_request(model: str, dims: int) -> bytes:
    """A ModelInferRequest whose one input has `dims` dimensions of 1, written as bytes (building 60 million
    dimensions through protobuf would take the tester's memory and minutes; the bytes take a second)."""
    tensor = inference_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32").SerializeToString()
    tensor += b"\x1a" + _varint(dims) + b"\x01" * dims  # field 3 (shape), packed int64
    return (inference_pb2.ModelInferRequest(model_name=model).SerializeToString()
            + b"\x2a" + _varint(len(tensor)) + tensor)  # field 5 (inputs)


def preprocess_request(session_id: str, x: np.ndarray, *, shape: list[int] | None = None,
                       data: bytes | None = None) -> enclave_pb2.PreprocessRequest:
    tensor = enclave_pb2.Tensor(shape=list(x.shape) if shape is None else shape,
                                data=np.ascontiguousarray(x, dtype="<f4").tobytes() if data is None else data)
    return enclave_pb2.PreprocessRequest(session_id=session_id, input=tensor)


def classify_request(session_id: str, x: np.ndarray, *, shape: list[int] | None = None,
                     data: bytes | None = None) -> enclave_pb2.ClassifyRequest:
    tensor = enclave_pb2.Tensor(shape=list(x.shape) if shape is None else shape,
                                data=np.ascontiguousarray(x, dtype="<f4").tobytes() if data is None else data)
    return enclave_pb2.ClassifyRequest(session_id=session_id, features=tensor)


def open_session(wire: Wire, token: str, label: str) -> Reply:
    body = enclave_pb2.OpenSessionRequest(license=token).SerializeToString()
    return wire.call(method(ENCLAVE_SERVICE, "OpenSession"), body, client_md(label))


def session_id_of(reply: Reply) -> str:
    return enclave_pb2.OpenSessionResponse.FromString(reply.body or b"").session_id
