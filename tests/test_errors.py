"""The one exception tree (sealnet/errors.py): statuses and exit codes, the servers' error interceptors (a
SealnetError becomes its status, anything else INTERNAL without its text), and the CLI's mapping of errors and
missing extras to exit codes."""

from __future__ import annotations

import asyncio
import importlib
import threading
from concurrent import futures

import grpc
import pytest

from sealnet.errors import (
    FailedPrecondition,
    InvalidArgument,
    MissingExtra,
    ResourceExhausted,
    SealnetError,
    exit_code_of,
    missing_extra,
)
from sealnet.rpc import INTERNAL_MESSAGE, MESSAGE_LIMIT, AsyncErrorInterceptor, ErrorInterceptor

S = grpc.StatusCode
SECRET = "k3y-material-0123456789"


def test_statuses_and_exit_codes():
    assert (InvalidArgument.status, InvalidArgument.exit_code) == (S.INVALID_ARGUMENT, 2)
    assert (ResourceExhausted.status, ResourceExhausted.exit_code) == (S.RESOURCE_EXHAUSTED, 1)
    assert (MissingExtra.exit_code, SealnetError.exit_code) == (3, 1)
    overridden = FailedPrecondition("x", status=S.UNAVAILABLE)
    assert (overridden.status, overridden.exit_code) == (S.UNAVAILABLE, 1) and exit_code_of(S.NOT_FOUND) == 2


def test_existing_errors_keep_their_bases_and_statuses():
    from sealnet.ca import CAError
    from sealnet.enclave_sim.policy import PolicyRefusal
    from sealnet.licenses import LicenseError
    from sealnet.runtime.errors import AttestationFailed, RequestError
    from sealnet.stamp import SerialError

    assert issubclass(CAError, ValueError) and issubclass(SerialError, ValueError) and issubclass(CAError, SealnetError)
    assert LicenseError("bad", "lic-1").status == S.PERMISSION_DENIED and LicenseError("bad", "lic-1").license_id
    assert [PolicyRefusal(k, "m").status for k in ("lockout", "quota", "revoked", "unavailable")] == [
        S.RESOURCE_EXHAUSTED, S.RESOURCE_EXHAUSTED, S.PERMISSION_DENIED, S.FAILED_PRECONDITION]
    refused = RequestError(S.NOT_FOUND, "model_name: unknown")
    assert refused.code == refused.status == S.NOT_FOUND and refused.exit_code == 2
    assert AttestationFailed("no").code == S.UNAVAILABLE


def _handlers(is_async: bool) -> grpc.GenericRpcHandler:
    def behave(request: bytes):
        if request == b"refuse":
            raise ResourceExhausted("quota: used up")
        if request == b"long":
            raise InvalidArgument("x" * (MESSAGE_LIMIT + 100))
        if request == b"bug":
            raise KeyError(SECRET)
        return b"ok:" + request

    if is_async:
        async def call(request, context):
            return behave(request)

        async def aborts(request, context):
            await context.abort(S.OUT_OF_RANGE, "handler's own abort")
    else:
        def call(request, context):
            return behave(request)

        def aborts(request, context):
            context.abort(S.OUT_OF_RANGE, "handler's own abort")

    return grpc.method_handlers_generic_handler("t.T", {
        "Call": grpc.unary_unary_rpc_method_handler(call), "Abort": grpc.unary_unary_rpc_method_handler(aborts)})


def _check(port: int, caplog) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call, abort = channel.unary_unary("/t.T/Call"), channel.unary_unary("/t.T/Abort")
        assert call(b"x", timeout=10) == b"ok:x"
        with pytest.raises(grpc.RpcError) as err:
            call(b"refuse", timeout=10)
        assert (err.value.code(), err.value.details()) == (S.RESOURCE_EXHAUSTED, "quota: used up")
        with pytest.raises(grpc.RpcError) as err:
            call(b"long", timeout=10)
        assert err.value.code() == S.INVALID_ARGUMENT and len(err.value.details()) < MESSAGE_LIMIT + 50
        with pytest.raises(grpc.RpcError) as err:
            call(b"bug", timeout=10)
        assert (err.value.code(), err.value.details()) == (S.INTERNAL, INTERNAL_MESSAGE.format(method="/t.T/Call"))
        with pytest.raises(grpc.RpcError) as err:
            abort(b"", timeout=10)
        assert (err.value.code(), err.value.details()) == (S.OUT_OF_RANGE, "handler's own abort")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "sealnet.rpc")
    assert "/t.T/Call failed: KeyError at" in logged and SECRET not in logged


def test_sync_interceptor(caplog):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((_handlers(False),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check(port, caplog)
    finally:
        server.stop(0)


def test_async_interceptor(caplog):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(interceptors=[AsyncErrorInterceptor()])
        server.add_generic_rpc_handlers((_handlers(True),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        _check(port, caplog)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_missing_extra_names_the_install():
    torch = missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch.nn"), "sealnet protect")
    assert isinstance(torch, MissingExtra)
    assert str(torch) == "`sealnet protect` needs PyTorch: pip install 'sealnet[train]'"
    plots = missing_extra(ModuleNotFoundError("no", name="matplotlib"), "sealnet attack")
    assert "sealnet[eval]" in str(plots)
    assert missing_extra(ModuleNotFoundError("no", name="somethingelse"), "sealnet x") is None


def test_cli_exit_codes(monkeypatch, capsys):
    cli = importlib.import_module("sealnet.cli.main")  # the module (sealnet.cli.main is also the function)

    def needs_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    def refuses(args):
        raise ResourceExhausted("quota: used up")

    def plain(args):
        raise FileNotFoundError("no such file: x")

    def other_module(args):
        raise ModuleNotFoundError("No module named 'nope'", name="nope")

    for func, code, text in [(needs_torch, 3, "`sealnet keystore` needs PyTorch: pip install 'sealnet[train]'"),
                             (refuses, 1, "quota: used up"), (plain, 2, "no such file: x")]:
        monkeypatch.setattr(cli, "cmd_keystore_init", func)
        assert cli.main(["keystore", "init", "/nonexistent"]) == code
        assert capsys.readouterr().err == f"error: {text}\n"
    monkeypatch.setattr(cli, "cmd_keystore_init", other_module)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["keystore", "init", "/nonexistent"])
