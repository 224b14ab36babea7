"""gRPC plumbing shared by the trusted module and the runtime: the protocol's constants (defined here only),
servicer registration so that unparseable request bytes get INVALID_ARGUMENT naming the message (instead of
gRPC's INTERNAL / UNKNOWN with a parser exception's text), `clip` (the one way a client-supplied string is
echoed in an error message), the error interceptors both servers install (a SealnetError becomes its status, any
other exception INTERNAL with a generic message), and serving until a signal."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import grpc

from sealnet.errors import SealnetError

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


MESSAGE_LIMIT = 4096  # characters of a status message (a SealnetError's text): metadata, as above
INTERNAL_MESSAGE = "internal error in {method}; the server's log names the cause"
log = logging.getLogger("sealnet.rpc")


def clip_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A whole status message cut to `limit` characters, saying how long it was (as `clip`, without the repr:
    the message is sealnet's own text)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _log_internal(method: str, exc: BaseException) -> None:
    """A handler's unexpected exception, logged without its text (which may hold a secret or a client's
    bytes): the type and where it was raised, enough to find the bug."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename}:{frame.lineno} in {frame.name}" if frame else ""
    log.error("%s failed: %s%s", method, type(exc).__name__, where)


def _errors_to_status(behavior: Callable, method: str) -> Callable:
    """A unary handler that answers a SealnetError with its status and message and any other exception with
    INTERNAL and a generic message; an abort the handler made itself passes through."""
    if inspect.iscoroutinefunction(behavior):
        async def mapped_async(request, context):
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except SealnetError as exc:
                await context.abort(exc.status, clip_message(str(exc)))
            except Exception as exc:
                _log_internal(method, exc)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(method=method))

        return mapped_async

    def mapped(request, context):
        try:
            return behavior(request, context)
        except SealnetError as exc:
            context.abort(exc.status, clip_message(str(exc)))
        except Exception as exc:
            if context.code() is not None:  # the handler aborted (grpc raises a bare Exception): keep its status
                raise
            _log_internal(method, exc)
            context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(method=method))

    return mapped


def _with_error_mapping(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:  # streaming handlers (health's Watch) are grpc's own
        return handler
    return handler._replace(unary_unary=_errors_to_status(handler.unary_unary, method))


class ErrorInterceptor(grpc.ServerInterceptor):
    """For grpc.server (the trusted module): handlers raise SealnetError instead of calling context.abort, and
    no exception text but a SealnetError's reaches a client."""

    def intercept_service(self, continuation, handler_call_details):
        return _with_error_mapping(continuation(handler_call_details), handler_call_details.method)


class AsyncErrorInterceptor(grpc.aio.ServerInterceptor):
    """The same for grpc.aio.server (the KServe endpoint)."""

    async def intercept_service(self, continuation, handler_call_details):
        return _with_error_mapping(await continuation(handler_call_details), handler_call_details.method)


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
