"""Protocol attacks on both services: malformed, over-sized and fuzzed requests, license brute force and replay,
expired / revoked / forged / non-canonical licenses, many clients' failures against an innocent one, session-id
guessing, and requests after the trusted module dies.

Loopback only, bounded in count and time, every call with a deadline. Each probe expects a specific gRPC
status; a crash (UNAVAILABLE / the process died), a hang (deadline exceeded), an unhandled error (UNKNOWN) or
an unprotected answer (OK where none was allowed) is a finding. The disruptive probe (killing the trusted
module) runs only with --demo or --enclave-pid.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet._grpc import enclave_pb2, inference_pb2
from sealnet.attacks.base import Budget, Metric, Outcome, Skip, Target, progress
from sealnet.attacks.fuzz import Seed, fuzz, random_floats, random_shape, random_text
from sealnet.attacks.plots import grouped_bars
from sealnet.attacks.registry import register_attack
from sealnet.attacks.wire import (
    CLIENT_METADATA,
    ENCLAVE_SERVICE,
    HEALTH_CHECK,
    RUNTIME_SERVICE,
    Wire,
    classify,
    classify_request,
    client_md,
    huge_shape_request,
    infer_request,
    license_md,
    method,
    open_session,
    preprocess_request,
    session_id_of,
)
from sealnet.bundle import CLASSIFY, PARAMS
from sealnet.licenses import LicenseError, issue_license, verify_license
from sealnet.rpc import LICENSE_METADATA
from sealnet.runtime.server import max_request_bytes

MAX_FAILURES = 10  # docs/security.md target: lockout after 10 bad licenses a minute per client (the module's default)
OVERSIZED = 65 << 20  # just over both servers' 64 MiB message limit
LONG = 20_000  # characters of an over-long client string (stock clients fail on status messages over 16 KiB)
MAX_ECHO = 1024  # longest error message a refusal may carry (client strings are clipped to 256 characters)
S = grpc.StatusCode
PARSER = "PARSER_REFUSAL"  # expected: gRPC's own refusal of unparseable bytes (its status differs sync / asyncio)


def _runtime(target: Target) -> Wire:
    if not target.endpoint:
        raise Skip("needs the runtime's address (--endpoint)")
    return Wire(target.endpoint)


def _enclave(target: Target) -> Wire:
    if not target.enclave:
        raise Skip("needs the trusted module's address (--enclave)")
    return Wire(target.enclave, target.enclave_tls)


def _spec(target: Target) -> tuple[str, tuple[int, ...], int]:
    manifest = target.bundle.manifest
    return manifest["model_id"], tuple(manifest["input"]["shape"][1:]), int(manifest.get("max_batch", 1024))


def _images(target: Target, n: int, fill: float | None = None) -> np.ndarray:
    _, item, _ = _spec(target)
    rng = np.random.default_rng(target.seed)
    return np.full((n, *item), fill, np.float32) if fill is not None else rng.random((n, *item), dtype=np.float32)


def _module_item(target: Target) -> tuple[int, ...]:
    """The item shape of the trusted module's data tensor: a sealed head's features, else the raw input."""
    if target.step == CLASSIFY:
        return (int(target.bundle.manifest["backbone"]["num_features"]),)
    return _spec(target)[1]


def _module_batch(target: Target, n: int, fill: float | None = None) -> np.ndarray:
    item = _module_item(target)
    rng = np.random.default_rng(target.seed)
    return np.full((n, *item), fill, np.float32) if fill is not None else rng.random((n, *item), dtype=np.float32)


def _module_request(target: Target, sid: str, x: np.ndarray, **kw) -> tuple[str, bytes]:
    """The module's tensor RPC for this bundle: Classify (features) for a sealed head, else Preprocess."""
    if target.step == CLASSIFY:
        return method(ENCLAVE_SERVICE, "Classify"), classify_request(sid, x, **kw).SerializeToString()
    return method(ENCLAVE_SERVICE, "Preprocess"), preprocess_request(sid, x, **kw).SerializeToString()


def forged_license(model_id: str) -> str:
    """A well-formed license signed by a key that is not the owner's: what a guessing attacker can make."""
    return issue_license(Ed25519PrivateKey.generate(), customer_id="mallory", model_id=model_id,
                         serial_number=f"SN-{secrets.token_hex(3)}", valid_seconds=3600)


def _valid_session(target: Target, enclave: Wire, label: str) -> str | None:
    if not target.license:
        return None
    reply = open_session(enclave, target.license, label)
    if reply.code != S.OK:
        raise RuntimeError(f"the valid license was refused by the trusted module: {reply.code.name}: {reply.details}")
    return session_id_of(reply)


# -- health ------------------------------------------------------------------------------------------------
def check_health(target: Target) -> dict[str, dict[str, bool]]:
    """Per service: health service SERVING, liveness, and a valid request answered (with the license)."""
    from grpc_health.v1 import health_pb2

    model, _, _ = _spec(target)
    health_body = health_pb2.HealthCheckRequest(service="").SerializeToString()
    serving = health_pb2.HealthCheckResponse.SERVING
    out: dict[str, dict[str, bool]] = {}
    if target.endpoint:
        wire = Wire(target.endpoint)
        try:
            h = wire.call(HEALTH_CHECK, health_body)
            live = wire.call(method(RUNTIME_SERVICE, "ServerLive"), b"")
            checks = {"health": h.code == S.OK and health_pb2.HealthCheckResponse.FromString(h.body).status == serving,
                      "live": live.code == S.OK and inference_pb2.ServerLiveResponse.FromString(live.body).live}
            if target.license:
                r = wire.call(method(RUNTIME_SERVICE, "ModelInfer"),
                              infer_request(model, _images(target, 2)).SerializeToString(), license_md(target.license))
                checks["valid_request"] = r.code == S.OK
            out["runtime"] = checks
        finally:
            wire.close()
    if target.enclave:
        wire = Wire(target.enclave, target.enclave_tls)
        try:
            h = wire.call(HEALTH_CHECK, health_body)
            own = wire.call(method(ENCLAVE_SERVICE, "Health"), b"")
            checks = {"health": h.code == S.OK and health_pb2.HealthCheckResponse.FromString(h.body).status == serving,
                      "live": own.code == S.OK and enclave_pb2.HealthResponse.FromString(own.body).serving}
            if target.license:
                opened = open_session(wire, target.license, "health")
                ok = opened.code == S.OK
                if ok:
                    r = wire.call(*_data_call(target, session_id_of(opened), 2))
                    ok = r.code == S.OK
                checks["valid_request"] = ok
            out["enclave"] = checks
        finally:
            wire.close()
    if target.alive is not None:
        for name, alive in target.alive().items():
            out.setdefault(name, {})["process_alive"] = alive
    return out


def preflight(target: Target) -> None:
    """Fail fast, naming the address, when a given service does not answer: otherwise every probe would
    report UNAVAILABLE and the report would be noise."""
    for name, address, service, tls in (("runtime", target.endpoint, RUNTIME_SERVICE, None),
                                        ("trusted module", target.enclave, ENCLAVE_SERVICE, target.enclave_tls)):
        if not address:
            continue
        wire = Wire(address, tls)
        try:
            probe = "ServerLive" if service == RUNTIME_SERVICE else "Health"
            reply = wire.call(method(service, probe), b"", timeout=5.0)
        finally:
            wire.close()
        if reply.code != S.OK:
            raise ConnectionError(f"the {name} at {address} does not answer ({reply.code.name}: {reply.details})")


# -- malformed requests ------------------------------------------------------------------------------------
def _runtime_cases(target: Target) -> list[tuple[str, str, bytes, Any, set]]:
    model, item, max_batch = _spec(target)
    lic = license_md(target.license)
    x = _images(target, 2)
    infer = method(RUNTIME_SERVICE, "ModelInfer")

    def req(**kw) -> bytes:
        return infer_request(model, kw.pop("x", x), **kw).SerializeToString()

    no_inputs = inference_pb2.ModelInferRequest(model_name=model).SerializeToString()
    two = infer_request(model, x)
    two.inputs.add(name="input2", datatype="FP32", shape=list(x.shape))
    two.raw_input_contents.append(x.tobytes())
    contents = infer_request(model, x)
    del contents.raw_input_contents[:]
    contents.inputs[0].contents.fp32_contents.extend([0.5] * 3)
    out_req = infer_request(model, x)
    out_req.outputs.add(name="not-an-output")
    both = infer_request(model, x)
    both.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    largest = max_request_bytes(max_batch, item)  # what the runtime lets through
    cases = [
        ("no license", infer, req(), None, {S.UNAUTHENTICATED}),
        ("empty license", infer, req(), [(LICENSE_METADATA, "")], {S.UNAUTHENTICATED}),
        ("unknown model", infer, infer_request("no-such-model", x).SerializeToString(), lic, {S.NOT_FOUND}),
        ("unknown version", infer, _with(infer_request(model, x), model_version="7"), lic, {S.NOT_FOUND}),
        ("empty body", infer, b"", lic, {S.NOT_FOUND}),
        ("unparseable body", infer, b"\xff\xff\xff\xff\x0f", lic, {PARSER}),
        ("unknown method", method(RUNTIME_SERVICE, "NoSuchMethod"), b"", lic, {S.UNIMPLEMENTED}),
        ("oversized message (65 MiB)", infer, os.urandom(OVERSIZED), lic, {S.RESOURCE_EXHAUSTED}),
        ("60 MB shape of 60,000,000 dimensions", infer, huge_shape_request(model, 60_000_000), lic,
         {S.RESOURCE_EXHAUSTED}),
        (f"{LONG:,}-character model name", infer, infer_request("m" * LONG, x).SerializeToString(), lic,
         {S.NOT_FOUND}),
        (f"{LONG:,}-character model version", infer, _with(infer_request(model, x), model_version="7" * LONG), lic,
         {S.NOT_FOUND}),
    ]
    if target.license:
        cases += [
            ("no inputs", infer, no_inputs, lic, {S.INVALID_ARGUMENT}),
            ("two inputs", infer, two.SerializeToString(), lic, {S.INVALID_ARGUMENT}),
            ("wrong input name", infer, req(name="image"), lic, {S.INVALID_ARGUMENT}),
            ("wrong dtype FP64", infer, req(datatype="FP64", raw=x.astype(np.float64).tobytes()), lic,
             {S.INVALID_ARGUMENT}),
            ("wrong dtype BYTES", infer, req(datatype="BYTES"), lic, {S.INVALID_ARGUMENT}),
            ("wrong rank", infer, req(shape=[2, int(np.prod(item))]), lic, {S.INVALID_ARGUMENT}),
            ("wrong item shape", infer, req(shape=[2, *item[:-1], item[-1] + 1]), lic, {S.INVALID_ARGUMENT}),
            ("batch 0", infer, req(shape=[0, *item], raw=b""), lic, {S.INVALID_ARGUMENT}),
            ("negative batch", infer, req(shape=[-2, *item]), lic, {S.INVALID_ARGUMENT}),
            ("batch 2^62", infer, req(shape=[2**62, *item]), lic, {S.INVALID_ARGUMENT}),
            (f"batch {max_batch + 1} (max + 1)", infer, req(x=_images(target, max_batch + 1)), lic,
             {S.INVALID_ARGUMENT}),
            ("raw bytes short", infer, req(raw=x.tobytes()[:-4]), lic, {S.INVALID_ARGUMENT}),
            ("raw bytes long", infer, req(raw=x.tobytes() + b"\0" * 4), lic, {S.INVALID_ARGUMENT}),
            ("fp32_contents count mismatch", infer, contents.SerializeToString(), lic, {S.INVALID_ARGUMENT}),
            ("NaN input", infer, req(x=_images(target, 1, np.nan)), lic, {S.INVALID_ARGUMENT}),
            ("infinite input", infer, req(x=_images(target, 1, np.inf)), lic, {S.INVALID_ARGUMENT}),
            ("unknown output", infer, out_req.SerializeToString(), lic, {S.INVALID_ARGUMENT}),
            ("largest accepted request, all shape (rank check first)", infer,
             huge_shape_request(model, largest - 256), lic, {S.INVALID_ARGUMENT}),
            (f"{LONG:,}-character input name", infer, req(name="i" * LONG), lic, {S.INVALID_ARGUMENT}),
            (f"{LONG:,}-character datatype", infer, req(datatype="F" * LONG), lic, {S.INVALID_ARGUMENT}),
            ("contents and raw_input_contents both set", infer, both.SerializeToString(), lic,
             {S.INVALID_ARGUMENT}),
            (f"batch {max_batch} (max) is served", infer, req(x=_images(target, max_batch)), lic, {S.OK}),
        ]
    return cases


def _data_call(target: Target, sid: str, n: int) -> tuple[str, bytes]:
    """The trusted module's data RPC for this bundle's method, for n items: PassportParams for passports,
    Classify for a sealed head, else Preprocess."""
    if target.step == PARAMS:
        return (method(ENCLAVE_SERVICE, "PassportParams"),
                enclave_pb2.PassportParamsRequest(session_id=sid, items=n).SerializeToString())
    return _module_request(target, sid, _module_batch(target, n))


def _with(msg, **fields) -> bytes:
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg.SerializeToString()


def _enclave_cases(target: Target, sid: str | None) -> list[tuple[str, str, bytes, Any, set]]:
    _, _, max_batch = _spec(target)
    item = _module_item(target)
    x = _module_batch(target, 2)
    pre, _ = _module_request(target, "", x)  # the module's tensor RPC (Preprocess, or Classify for a sealed head)
    opn = method(ENCLAVE_SERVICE, "OpenSession")
    att = method(ENCLAVE_SERVICE, "Attest")

    def req(**kw) -> bytes:
        return _module_request(target, sid or "", kw.pop("x", x), **kw)[1]

    def lic_body(token: str) -> bytes:
        return enclave_pb2.OpenSessionRequest(license=token).SerializeToString()

    cases = [
        ("no session id", pre, _module_request(target, "", x)[1], None, {S.UNAUTHENTICATED}),
        ("guessed session id", pre, _module_request(target, secrets.token_urlsafe(24), x)[1], None,
         {S.UNAUTHENTICATED}),
        ("empty license", opn, lic_body(""), client_md("malformed"), {S.INVALID_ARGUMENT}),
        ("garbage license", opn, lic_body("not-a-license"), client_md("malformed"), {S.PERMISSION_DENIED}),
        ("5000-character license", opn, lic_body("sn1." + "A" * 4996), client_md("malformed"),
         {S.PERMISSION_DENIED}),
        ("attest: 8-byte nonce", att, enclave_pb2.AttestRequest(nonce=b"12345678").SerializeToString(), None,
         {S.INVALID_ARGUMENT}),
        ("attest: 65-byte nonce", att, enclave_pb2.AttestRequest(nonce=os.urandom(65)).SerializeToString(), None,
         {S.INVALID_ARGUMENT}),
        ("unparseable body", pre, b"\xff\xff\xff\xff\x0f", None, {PARSER}),
        ("unknown method", method(ENCLAVE_SERVICE, "NoSuchMethod"), b"", None, {S.UNIMPLEMENTED}),
        ("oversized message (65 MiB)", pre, os.urandom(OVERSIZED), None, {S.RESOURCE_EXHAUSTED}),
    ]
    if sid and target.step == PARAMS:
        pp = method(ENCLAVE_SERVICE, "PassportParams")

        def items(n: int) -> bytes:
            return enclave_pb2.PassportParamsRequest(session_id=sid, items=n).SerializeToString()

        cases += [
            ("passport: items 0", pp, items(0), None, {S.INVALID_ARGUMENT}),
            ("passport: items -1", pp, items(-1), None, {S.INVALID_ARGUMENT}),
            (f"passport: items {max_batch + 1} (max + 1)", pp, items(max_batch + 1), None, {S.INVALID_ARGUMENT}),
            ("passport: Preprocess on a passport bundle", pre, req(), None, {S.FAILED_PRECONDITION}),
            (f"passport: items {max_batch} (max) is served", pp, items(max_batch), None, {S.OK}),
        ]
    elif sid:
        no_input = (enclave_pb2.ClassifyRequest if target.step == CLASSIFY
                    else enclave_pb2.PreprocessRequest)(session_id=sid).SerializeToString()
        if target.step == CLASSIFY:
            cases.append(("sealed-head: Preprocess on a sealed-head bundle", method(ENCLAVE_SERVICE, "Preprocess"),
                          preprocess_request(sid, _images(target, 2)).SerializeToString(), None,
                          {S.FAILED_PRECONDITION}))
        cases += [
            ("no input tensor", pre, no_input, None, {S.INVALID_ARGUMENT}),
            ("wrong rank", pre, req(shape=[2, *item, 1]), None, {S.INVALID_ARGUMENT}),
            ("wrong item shape", pre, req(shape=[2, *item[:-1], item[-1] + 1]), None, {S.INVALID_ARGUMENT}),
            ("batch 0", pre, req(shape=[0, *item], data=b""), None, {S.INVALID_ARGUMENT}),
            ("batch 2^62", pre, req(shape=[2**62, *item]), None, {S.INVALID_ARGUMENT}),
            (f"batch {max_batch + 1} (max + 1)", pre, req(x=_module_batch(target, max_batch + 1)), None,
             {S.INVALID_ARGUMENT}),
            ("data short", pre, req(data=x.tobytes()[:-4]), None, {S.INVALID_ARGUMENT}),
            ("NaN input", pre, req(x=_module_batch(target, 1, np.nan)), None, {S.INVALID_ARGUMENT}),
            ("infinite input", pre, req(x=_module_batch(target, 1, -np.inf)), None, {S.INVALID_ARGUMENT}),
            (f"batch {max_batch} (max) is served", pre, req(x=_module_batch(target, max_batch)), None, {S.OK}),
        ]
    return cases


@register_attack(
    "protocol-malformed", suite="protocol", title="Malformed requests: each expects a specific status",
    targets="0 unexpected statuses; 0 crashes, hangs, unprotected answers",
    knowledge="A2 insider on the edge host: can call both gRPC services directly with any bytes (the trusted "
              "module's Unix socket is reachable by the runtime's user); holds a valid license where a case "
              "needs one.")
def malformed(target: Target, budget: Budget, out: Path) -> Outcome:
    if not (target.endpoint or target.enclave):
        raise Skip("needs --endpoint and/or --enclave")
    results: list[dict[str, Any]] = []
    metrics: list[Metric] = []
    for service, make_wire in (("runtime", _runtime), ("enclave", _enclave)):
        try:
            wire = make_wire(target)
        except Skip:
            continue
        try:
            cases = (_runtime_cases(target) if service == "runtime"
                     else _enclave_cases(target, _valid_session(target, wire, "malformed")))
            wrong = findings = longest = 0
            for name, path, body, metadata, expected in progress(cases, desc=f"{service} malformed", unit="case"):
                reply = wire.call(path, body, metadata)
                longest = max(longest, len(reply.details))
                kind = classify(reply, S.OK in expected)
                as_expected = reply.code in expected or (PARSER in expected and kind == "parser")
                wrong += not as_expected
                findings += kind not in ("ok", "refused", "parser")
                results.append({"service": service, "case": name,
                                "expected": sorted(getattr(c, "name", c) for c in expected),
                                "status": reply.code.name, "details": reply.details[:160], "as_expected": as_expected})
        finally:
            wire.close()
        metrics += [Metric(f"{service}.unexpected_status", wrong, "<=", 0, unit="count",
                           note=f"{len(cases)} cases, each with its expected status"),
                    Metric(f"{service}.crash_hang_unprotected", findings, "<=", 0, unit="count"),
                    Metric(f"{service}.longest_error_message", longest, "<=", MAX_ECHO, unit="chars",
                           note="client strings are echoed clipped, never whole")]
    return Outcome(metrics, details={"cases": results})


# -- fuzzing -----------------------------------------------------------------------------------------------
def _runtime_seeds(target: Target) -> list[Seed]:
    model, item, max_batch = _spec(target)

    def structured(rng: np.random.Generator) -> inference_pb2.ModelInferRequest:
        req = inference_pb2.ModelInferRequest(
            model_name=model if rng.random() < 0.8 else random_text(rng),
            model_version=str(rng.choice(["", "", "1", "2", random_text(rng, 5)])), id=random_text(rng, 10))
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
            shape = random_shape(rng, item, max_batch)
            inp = req.inputs.add(name="input" if rng.random() < 0.8 else random_text(rng),
                                 datatype=str(rng.choice(["FP32", "FP32", "FP64", "INT8", "BYTES", "FP16", ""])),
                                 shape=shape)
            if rng.random() < 0.15:
                data = random_floats(rng, shape)[:16384]
                inp.contents.fp32_contents.extend(np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4").tolist())
            if rng.random() < 0.1:
                inp.parameters[random_text(rng, 8)].string_param = random_text(rng)
            if rng.random() < 0.9:
                req.raw_input_contents.append(random_floats(rng, shape))
        if rng.random() < 0.2:
            req.outputs.add(name="logits" if rng.random() < 0.5 else random_text(rng))
        return req

    valid = infer_request(model, _images(target, 2))
    seeds = [Seed(method(RUNTIME_SERVICE, "ModelInfer"), valid, None, lambda _: False, structured)]
    if target.license:  # with a valid license, any request the server can parse may be answered
        seeds.append(Seed(method(RUNTIME_SERVICE, "ModelInfer"), valid, license_md(target.license),
                          lambda _: True, structured))
    seeds += [
        Seed(method(RUNTIME_SERVICE, "ModelMetadata"), inference_pb2.ModelMetadataRequest(name=model)),
        Seed(method(RUNTIME_SERVICE, "ModelReady"), inference_pb2.ModelReadyRequest(name=model)),
        Seed(method(RUNTIME_SERVICE, "ServerMetadata"), inference_pb2.ServerMetadataRequest()),
    ]
    return seeds


def _enclave_seeds(target: Target, sid: str | None) -> list[Seed]:
    model, _, max_batch = _spec(target)
    item = _module_item(target)
    owner = target.bundle.owner_public_key
    session = sid or secrets.token_urlsafe(24)
    sealed_head = target.step == CLASSIFY

    def structured(rng: np.random.Generator):
        shape = random_shape(rng, item, max_batch)
        sess = str(rng.choice([session, session, "", random_text(rng, 32)]))
        tensor = enclave_pb2.Tensor(shape=shape, data=random_floats(rng, shape))
        if sealed_head:
            return enclave_pb2.ClassifyRequest(session_id=sess, features=tensor)
        return enclave_pb2.PreprocessRequest(session_id=sess, input=tensor)

    def license_ok(msg) -> bool:
        try:
            verify_license(msg.license, owner, model_id=model)
            return True
        except LicenseError:
            return False

    def structured_params(rng: np.random.Generator) -> enclave_pb2.PassportParamsRequest:
        sess = str(rng.choice([session, session, "", random_text(rng, 32)]))
        n = int(rng.choice([0, 1, max_batch, max_batch + 1, -1, 2**62, int(rng.integers(-10**9, 10**9))]))
        return enclave_pb2.PassportParamsRequest(session_id=sess, items=n)

    token = target.license or forged_license(model)
    if target.step == PARAMS:
        data_seed = Seed(method(ENCLAVE_SERVICE, "PassportParams"),
                         enclave_pb2.PassportParamsRequest(session_id=session, items=2),
                         ok_allowed=lambda msg: bool(sid) and msg.session_id == sid and 1 <= msg.items <= max_batch,
                         structured=structured_params)
    else:
        rpc = "Classify" if sealed_head else "Preprocess"
        request = (classify_request if sealed_head else preprocess_request)(session, _module_batch(target, 2))
        data_seed = Seed(method(ENCLAVE_SERVICE, rpc), request,
                         ok_allowed=lambda msg: bool(sid) and msg.session_id == sid, structured=structured)
    return [
        data_seed,
        Seed(method(ENCLAVE_SERVICE, "OpenSession"), enclave_pb2.OpenSessionRequest(license=token),
             client_md("fuzz"), ok_allowed=license_ok),
        Seed(method(ENCLAVE_SERVICE, "Attest"), enclave_pb2.AttestRequest(nonce=os.urandom(32))),
        Seed(method(ENCLAVE_SERVICE, "Health"), enclave_pb2.HealthRequest()),
    ]


@register_attack(
    "protocol-fuzz", suite="protocol", title="Fuzzing both services with random and mutated requests",
    targets="all requests sent; 0 crashes, hangs, unhandled errors, unprotected answers; healthy afterwards",
    knowledge="A2 insider: sends arbitrary bytes to every method of both services (mutated valid requests, "
              "random structured messages, random bytes), with and without a valid license / session.")
def protocol_fuzz(target: Target, budget: Budget, out: Path) -> Outcome:
    if not (target.endpoint or target.enclave):
        raise Skip("needs --endpoint and/or --enclave")
    metrics: list[Metric] = []
    details: dict[str, Any] = {}
    codes: dict[str, dict[str, int]] = {}
    notes = ["'parser' answers are refusals of unparseable bytes (sealnet: INVALID_ARGUMENT 'request: not a valid ... "
             "message'; stock gRPC: INTERNAL or UNKNOWN naming the DecodeError); any other INTERNAL or UNKNOWN is an "
             "unhandled error"]
    for i, (service, make_wire) in enumerate((("runtime", _runtime), ("enclave", _enclave))):
        try:
            wire = make_wire(target)
        except Skip:
            continue
        try:
            seeds = (_runtime_seeds(target) if service == "runtime"
                     else _enclave_seeds(target, _valid_session(target, wire, "fuzz-valid")))
            stats = fuzz(wire, seeds, count=budget.fuzz_requests, seconds=budget.fuzz_seconds,
                         seed=target.seed * 10 + i, desc=f"{service} fuzz")
        finally:
            wire.close()
        codes[service] = dict(stats.codes)
        details[service] = {"sent": stats.sent, "seconds": round(stats.seconds, 1), "kinds": dict(stats.kinds),
                            "statuses": dict(stats.codes), "parser_refusals": dict(stats.parser_codes),
                            "findings": stats.findings, "aborted": stats.aborted}
        if stats.parser_codes.get("UNKNOWN"):
            notes.append(f"{service}: unparseable requests are answered UNKNOWN with the DecodeError's class and "
                         "message (grpc.aio's default), not INVALID_ARGUMENT; harmless, but it tells a prober "
                         "which message type each method parses")
        metrics += [
            Metric(f"{service}.requests", stats.sent, ">=", budget.fuzz_requests, unit="count",
                   note=f"{stats.sent / max(stats.seconds, 1e-9):.0f} req/s"
                        + (f"; stopped: {stats.aborted}" if stats.aborted else "")),
            Metric(f"{service}.crashes", stats.kinds["crash"], "<=", 0, unit="count"),
            Metric(f"{service}.hangs", stats.kinds["hang"], "<=", 0, unit="count",
                   note="no answer within the 10 s deadline"),
            Metric(f"{service}.unhandled_errors", stats.kinds["unhandled"], "<=", 0, unit="count"),
            Metric(f"{service}.unprotected_answers", stats.kinds["unprotected"], "<=", 0, unit="count"),
        ]
    health = check_health(target)
    details["health_after"] = health
    for service, checks in health.items():
        metrics.append(Metric(f"{service}.healthy_after", float(all(checks.values())), "==", 1, unit="count",
                              note=", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items())))
    statuses = sorted({c for per in codes.values() for c in per})
    grouped_bars(out / "protocol_fuzz.png", statuses, {s: [codes[s].get(c, 0) for c in statuses] for s in codes},
                 title="Fuzzing: answers by gRPC status", ylabel="requests", lines={}, ylim=None)
    return Outcome(metrics, details=details, plots=["protocol_fuzz.png"], notes=notes)


# -- sessions and licenses ---------------------------------------------------------------------------------
@register_attack(
    "session-guessing", suite="protocol", title="Guessing session ids on the trusted module",
    targets="0 answered guesses; every guess UNAUTHENTICATED",
    knowledge="A2 insider without a license: calls Preprocess directly with guessed session ids.")
def session_guessing(target: Target, budget: Budget, out: Path) -> Outcome:
    wire = _enclave(target)
    x = _images(target, 1)
    guesses: Counter[str] = Counter()
    start = time.monotonic()
    try:
        for _ in progress(range(budget.session_guesses), desc="session guesses", unit="guess"):
            reply = wire.call(method(ENCLAVE_SERVICE, "Preprocess"),
                              preprocess_request(secrets.token_urlsafe(24), x).SerializeToString())
            guesses[reply.code.name] += 1
    finally:
        wire.close()
    rate = budget.session_guesses / max(time.monotonic() - start, 1e-9)
    years = 2.0**191 / rate / 3.15e7
    other = sum(v for k, v in guesses.items() if k not in ("OK", "UNAUTHENTICATED"))
    return Outcome(
        [Metric("answered_guesses", guesses["OK"], "<=", 0, unit="count"),
         Metric("other_statuses", other, "<=", 0, unit="count", note="every guess expects UNAUTHENTICATED"),
         Metric("guesses_per_second", rate, unit="rate",
                note=f"not rate-limited; 192-bit ids: expected {years:.1e} years to hit one")],
        details={"statuses": dict(guesses)},
        notes=["session-id guesses are not counted by the lockout; the 192-bit id space is what protects them"])


@register_attack(
    "license-checks", suite="protocol", title="Forged, tampered, expired, other-model and revoked licenses; replay",
    targets="each refused with PERMISSION_DENIED; replay is an observation",
    knowledge="A3 dishonest licensee / A2 insider: holds a valid license (may tamper with or replay it); the owner "
              "key, when lent to the test (--owner-key, or --demo), only serves to mint expired / other-model "
              "licenses as a real owner would have issued them.")
def license_checks(target: Target, budget: Budget, out: Path) -> Outcome:
    wire = _enclave(target)
    model, _, _ = _spec(target)
    probes: list[tuple[str, str]] = [("forged (not the owner's key)", forged_license(model))]
    skipped = []
    if target.license:
        head, payload, sig = target.license.split(".")
        flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
        probes.append(("tampered payload", f"{head}.{flipped}.{sig}"))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        respelled = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]  # same bytes: an unused bit set
        probes.append(("valid license, non-canonical base64 spelling", f"{head}.{payload}.{respelled}"))
    else:
        skipped.append("tampered payload and replay: no --license-file")
    if target.owner_key is not None:
        now = int(time.time())
        mint = dict(customer_id="acme", serial_number="SN-TEST")
        probes += [
            ("expired", issue_license(target.owner_key, model_id=model, valid_seconds=60, not_before=now - 3600,
                                      **mint)),
            ("not yet valid", issue_license(target.owner_key, model_id=model, valid_seconds=60,
                                            not_before=now + 3600, **mint)),
            ("other model", issue_license(target.owner_key, model_id=model + "-other", valid_seconds=600, **mint)),
        ]
    else:
        skipped.append("expired / not-yet-valid / other-model: no owner key (--owner-key)")
    if target.revoked_license:
        probes.append(("revoked", target.revoked_license))
    else:
        skipped.append("revoked: no revoked license given (--revoked-license-file)")
    metrics, rows = [], []
    try:
        for name, token in progress(probes, desc="license checks", unit="license"):
            reply = open_session(wire, token, "license-check")
            refused = reply.code == S.PERMISSION_DENIED
            rows.append({"license": name, "status": reply.code.name, "details": reply.details[:160]})
            metrics.append(Metric(f"refused:{name}", float(refused), "==", 1, unit="count",
                                  note=f"expects PERMISSION_DENIED, got {reply.code.name}"))
        if target.license:
            first = open_session(wire, target.license, "replay-a")
            second = open_session(wire, target.license, "replay-b")
            replayed = first.code == S.OK and second.code == S.OK
            metrics.append(Metric("replay_from_another_client_accepted", float(replayed), unit="count",
                                  note="observation: a license is a bearer token, valid from anywhere until expiry"))
            rows.append({"license": "valid, replayed by a second client", "status": second.code.name})
    finally:
        wire.close()
    return Outcome(metrics, details={"probes": rows}, notes=[f"skipped: {s}" for s in skipped])


def _until_locked(send, limit: int) -> tuple[int, list[str]]:
    """Send bad licenses until RESOURCE_EXHAUSTED; returns (failures before the lockout, statuses)."""
    statuses: list[str] = []
    for _ in range(limit):
        code = send()
        statuses.append(code.name)
        if code == S.RESOURCE_EXHAUSTED:
            return len(statuses) - 1, statuses
    return len(statuses), statuses


@register_attack(
    "license-brute-force", suite="protocol", title="License brute force: lockout after 10 failures per client",
    targets="RESOURCE_EXHAUSTED after <= 10 failures per client; a valid license still served (on its open "
            "session too); others unaffected",
    knowledge="A2 insider / outside client: guesses licenses (well-formed tokens signed by other keys), directly "
              "at the trusted module and through the runtime endpoint.")
def brute_force(target: Target, budget: Budget, out: Path) -> Outcome:
    if not (target.endpoint or target.enclave):
        raise Skip("needs --endpoint and/or --enclave")
    model, _, _ = _spec(target)
    metrics, details, notes = [], {}, []
    if target.enclave:
        wire = _enclave(target)
        label = client_md("bruteforce")
        session = None
        if target.license:  # a session opened before the lockout, as the runtime caches one per license
            opened = wire.call(method(ENCLAVE_SERVICE, "OpenSession"),
                               enclave_pb2.OpenSessionRequest(license=target.license).SerializeToString(), label)
            session = session_id_of(opened) if opened.code == S.OK else None
        try:
            before, statuses = _until_locked(
                lambda: wire.call(method(ENCLAVE_SERVICE, "OpenSession"),
                                  enclave_pb2.OpenSessionRequest(license=forged_license(model)).SerializeToString(),
                                  label).code, 3 * MAX_FAILURES)
            details["enclave"] = statuses
            metrics.append(Metric("enclave.failures_before_lockout", before, "<=", MAX_FAILURES, unit="count",
                                  note="target: lockout after 10 bad licenses a minute per client"))
            if target.license:
                good = wire.call(method(ENCLAVE_SERVICE, "OpenSession"),
                                 enclave_pb2.OpenSessionRequest(license=target.license).SerializeToString(), label)
                # the signature is checked first: guesses lock out guesses, never a license the owner signed
                metrics.append(Metric("enclave.locked_client_valid_license_served", float(good.code == S.OK), "==",
                                      1, unit="count", note=f"got {good.code.name}"))
                if session:
                    path, body = _data_call(target, session, 1)
                    cached = wire.call(path, body, label)
                    metrics.append(Metric("enclave.locked_client_open_session_served", float(cached.code == S.OK),
                                          "==", 1, unit="count",
                                          note=f"a session opened before the lockout; got {cached.code.name}"))
                other = open_session(wire, target.license, "bystander")
                metrics.append(Metric("enclave.other_client_unaffected", float(other.code == S.OK), "==", 1,
                                      unit="count", note=f"got {other.code.name}"))
        finally:
            wire.close()
    if target.endpoint:
        wire = _runtime(target)
        body = infer_request(model, _images(target, 1)).SerializeToString()
        try:
            before, statuses = _until_locked(
                lambda: wire.call(method(RUNTIME_SERVICE, "ModelInfer"), body,
                                  license_md(forged_license(model))).code, 3 * MAX_FAILURES)
        finally:
            wire.close()
        details["runtime"] = statuses
        metrics.append(Metric("runtime.failures_before_lockout", before, "<=", MAX_FAILURES, unit="count",
                              note="through the endpoint: the runtime forwards the client address"))
        notes.append("this client address's further bad licenses are refused at once for the lockout window (60 s "
                     "by default); its valid licenses, and everyone else's, are still served")
    return Outcome(metrics, details=details, notes=notes)


@register_attack(
    "remote-lockout", suite="protocol", title="Many clients' failures do not lock out an innocent client",
    targets="the failing clients RESOURCE_EXHAUSTED; a new client with a valid license served",
    knowledge="Outside clients from many addresses (played by naming them as the runtime does, in sealnet-client "
              "metadata on the trusted module's socket): each sends forged licenses, hoping to trip a ceiling "
              "shared by every client of the runtime and so lock out everybody else.")
def remote_lockout(target: Target, budget: Budget, out: Path) -> Outcome:
    wire = _enclave(target)
    model, _, _ = _spec(target)
    run = secrets.token_hex(3)
    opn = method(ENCLAVE_SERVICE, "OpenSession")

    def body(token: str) -> bytes:
        return enclave_pb2.OpenSessionRequest(license=token).SerializeToString()

    statuses: Counter[str] = Counter()
    try:
        for i in progress(range(10), desc="remote clients", unit="client"):
            md = [(CLIENT_METADATA, f"ipv4:198.51.100.{i}-{run}")]
            for _ in range(MAX_FAILURES + 1):
                statuses[wire.call(opn, body(forged_license(model)), md).code.name] += 1
        metrics = [Metric("failing_clients_locked", statuses["RESOURCE_EXHAUSTED"], ">=", 10, unit="count",
                          note=f"statuses of {sum(statuses.values())} forged attempts: {dict(statuses)}")]
        if target.license:
            innocent = wire.call(opn, body(target.license), [(CLIENT_METADATA, f"ipv4:203.0.113.1-{run}")])
            metrics.append(Metric("innocent_client_served", float(innocent.code == S.OK), "==", 1, unit="count",
                                  note=f"a new client with a valid license got {innocent.code.name}"))
    finally:
        wire.close()
    return Outcome(metrics, details={"statuses": dict(statuses)},
                   notes=["no ceiling is shared between clients; a caller that is not a trusted forwarder (an mTLS "
                          "certificate other than the runtime's) cannot name clients, so it gets no extra guesses"])


@register_attack(
    "fail-closed", suite="protocol", title="Requests after the trusted module dies",
    targets="0 answers; every request UNAVAILABLE; server not ready",
    knowledge="A2 insider who kills (or crashes) the trusted module, then asks the runtime with a valid license: "
              "any answer would come from the public network without the transform.")
def fail_closed(target: Target, budget: Budget, out: Path) -> Outcome:
    if target.kill_enclave is None:
        raise Skip("kills the trusted module: only with --demo (services the suite started) or --enclave-pid PID")
    if not (target.endpoint and target.license):
        raise Skip("needs --endpoint and --license-file")
    model, _, _ = _spec(target)
    wire = _runtime(target)
    body = infer_request(model, _images(target, 2)).SerializeToString()
    infer = method(RUNTIME_SERVICE, "ModelInfer")
    try:
        before = wire.call(infer, body, license_md(target.license))
        # RESOURCE_EXHAUSTED: this address is still locked out by the brute-force probe; the module answered
        # (refusing), so it was up, and every answer after the kill must still be UNAVAILABLE.
        if before.code not in (S.OK, S.RESOURCE_EXHAUSTED):
            raise Skip(f"the runtime does not answer a valid request even before the kill ({before.code.name}); "
                       "not killing the trusted module, the result would prove nothing")
        target.kill_enclave()
        statuses: dict[str, int] = {}
        for _ in progress(range(budget.dead_requests), desc="requests after the module died", unit="req"):
            code = wire.call(infer, body, license_md(target.license)).code.name
            statuses[code] = statuses.get(code, 0) + 1
        time.sleep(1.2)  # readiness is cached for up to a second
        ready = wire.call(method(RUNTIME_SERVICE, "ServerReady"), b"")
        not_ready = ready.code != S.OK or not inference_pb2.ServerReadyResponse.FromString(ready.body).ready
    finally:
        wire.close()
    return Outcome(
        [Metric("answers_after_death", statuses.get("OK", 0), "<=", 0, unit="count"),
         Metric("non_unavailable_statuses", sum(v for k, v in statuses.items() if k not in ("OK", "UNAVAILABLE")),
                "<=", 0, unit="count", note="every request expects UNAVAILABLE"),
         Metric("server_reports_not_ready", float(not_ready), "==", 1, unit="count")],
        details={"statuses": statuses})
