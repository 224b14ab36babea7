"""gRPC plumbing shared by the trusted module and the runtime: the protocol's constants (defined here only),
servicer registration so that unparseable request bytes get INVALID_ARGUMENT naming the message (instead of
gRPC's INTERNAL / UNKNOWN with a parser exception's text), `clip` (the one way a client-supplied string is
echoed in an error message), and serving until a signal."""

from __future__ import annotations

import inspect
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc

LICENSE_METADATA = "sealnet-license"  # request metadata key of an end client's license (KServe endpoint)
CLIENT_METADATA = "sealnet-client"  # the end client's identity, forwarded by the runtime to the trusted module
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # both services, both directions

_UNPARSEABLE = object()
ECHO_LIMIT = 256  # characters of a client-supplied string an error message may repeat


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """A client-supplied string as an error message may show it: its repr, cut to `limit` characters (status
    messages travel as metadata; stock clients fail on more than 16 KiB of it)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class _Capture:
    """Stands in for a server while a generated add_*_to_server function hands over its method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # any parser failure: the handler answers INVALID_ARGUMENT
            return _UNPARSEABLE

    return parse


def _guard(behavior, message: str):
    detail = f"request: not a valid {message} message"
    if inspect.iscoroutinefunction(behavior):
        async def guarded_async(request, context):
            if request is _UNPARSEABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
            return await behavior(request, context)

        return guarded_async

    def guarded(request, context):
        if request is _UNPARSEABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
        return behavior(request, context)

    return guarded


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    """Like the generated `add_XServicer_to_server(servicer, server)`, with guarded request parsing."""
    capture = _Capture()
    add_to_server(servicer, capture)
    handlers = {}
    for method, handler in capture.handlers.items():
        message = f"{capture.service}.{method} request"
        handlers[method] = handler._replace(request_deserializer=_safe(handler.request_deserializer),
                                            unary_unary=_guard(handler.unary_unary, message))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


def default_enclave_address() -> str:
    """The trusted module's Unix socket when none is given (per user, so the socket's 0600 mode is enough)."""
    return f"unix:/tmp/sealnet-{os.getuid()}/enclave.sock"


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for wait_forever."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_forever(server, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set, Ctrl-C, or the server ends; then stop it with a short grace period."""
    try:
        while not (stop and stop.is_set()):
            if not server.wait_for_termination(timeout=0.5):  # False: the server has terminated
                break
    except KeyboardInterrupt:
        pass
    server.stop(grace=2).wait()
