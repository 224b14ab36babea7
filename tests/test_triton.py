"""Serving bundles through NVIDIA Triton Inference Server (the pip tritonserver 2.51 on CPU, installed by ./dev):
stock tritonclient over HTTP and gRPC, one Triton start for the module (transform and sealed head as ensembles of
the module step and the public model, DSN with the public model over BLS, passport inline), real trusted modules
on Unix sockets, the python engine as the reference."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim.policy import PolicyConfig
from sealnet.enclave_sim.service import EnclaveOptions
from sealnet.licenses import issue_license
from sealnet.processes import free_port, sealnet_command
from sealnet.runtime.errors import EnclaveError, RequestError
from sealnet.runtime.identity import TrustedProxies
from sealnet.runtime.triton.protocol import credentials, refusal_reason, sealnet_status, without_ensemble_prefix
from sealnet.runtime.triton.repo import RepoOptions, protected_config, write_repository
from sealnet.runtime.triton.server import TritonServer, triton_unavailable_reason
from tests.conftest import DSN_MODEL_ID, MODEL_ID, PASSPORT_MODEL_ID, SEALED_HEAD_MODEL_ID

MAX_FAILURES = 3  # the transform module's lockout threshold here (per end client)


# -- the repository and the request rules (no server) ----------------------------------------------------------
def test_repository_has_the_protected_model_and_the_public_network_for_every_backend(artefacts, passport_bundle,
                                                                                      tmp_path):
    write_repository(artefacts["bundle"], tmp_path, RepoOptions("unix:/tmp/x.sock", network="bls",
                                                               max_queue_delay_us=200))
    protected = (tmp_path / MODEL_ID / "config.pbtxt").read_text()
    assert 'backend: "python"' in protected and "max_queue_delay_microseconds: 200" in protected
    assert f'string_value: "bls:{MODEL_ID}-public"' in protected
    assert (tmp_path / MODEL_ID / "bundle" / "manifest.json").is_file()
    assert "sealnet.runtime.triton.backend" in (tmp_path / MODEL_ID / "1" / "model.py").read_text()
    public = tmp_path / f"{MODEL_ID}-public"
    assert 'backend: "python"' in (public / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in (public / "configs" / "onnxruntime.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in (public / "configs" / "tensorrt.pbtxt").read_text()
    assert (public / "1" / "model.onnx").read_bytes() == (artefacts["bundle"] / "public.onnx").read_bytes()
    with pytest.raises(FileExistsError):
        write_repository(artefacts["bundle"], tmp_path, RepoOptions("unix:/tmp/x.sock"))
    with pytest.raises(ValueError, match="passport"):
        write_repository(passport_bundle["bundle"], tmp_path / "p", RepoOptions("unix:/tmp/x.sock", network="bls"))
    with pytest.raises(ValueError, match="mTLS"):
        write_repository(artefacts["bundle"], tmp_path / "t", RepoOptions("127.0.0.1:9001"))


def test_ensemble_wires_the_module_step_and_the_public_model_in_the_bundles_order(artefacts, sealed_head, tmp_path):
    options = RepoOptions("unix:/tmp/x.sock", network="ensemble", ort_threads=2, public_instances=2,
                          accelerator="tensorrt")
    write_repository(artefacts["bundle"], tmp_path, options)  # transform: module first
    ensemble = (tmp_path / MODEL_ID / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble and 'name: "input"' in ensemble and 'name: "logits"' in ensemble
    first = ensemble.index(f'model_name: "{MODEL_ID}-module"')
    assert first < ensemble.index(f'model_name: "{MODEL_ID}-public"')
    assert 'output_map { key: "processed" value: "processed" }' in ensemble
    module = (tmp_path / f"{MODEL_ID}-module" / "config.pbtxt").read_text()
    assert 'backend: "python"' in module and 'string_value: "ensemble"' in module
    assert (tmp_path / f"{MODEL_ID}-module" / "bundle" / "manifest.json").is_file()
    ort = (tmp_path / f"{MODEL_ID}-public" / "configs" / "onnxruntime.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in ort and "dynamic_batching" in ort and "count: 2" in ort
    assert 'key: "intra_op_thread_count" value: { string_value: "2" }' in ort and 'name : "tensorrt"' in ort
    write_repository(sealed_head["bundle"], tmp_path, RepoOptions("unix:/tmp/y.sock", network="ensemble"))
    ensemble = (tmp_path / SEALED_HEAD_MODEL_ID / "config.pbtxt").read_text()  # sealed head: module last
    assert ensemble.index(f'"{SEALED_HEAD_MODEL_ID}-public"') < ensemble.index(f'"{SEALED_HEAD_MODEL_ID}-module"')
    assert 'output_map { key: "label" value: "label" }' in ensemble


def test_sealed_head_outputs_become_the_models_outputs(artefacts):
    manifest = {**artefacts["manifest"], "method": "sealed-head",
                "outputs": [{"name": "classes", "datatype": "INT64", "shape": [-1, 3]},
                            {"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]}
    config = protected_config(manifest, RepoOptions("unix:/tmp/x.sock"), None)
    assert '{ name: "classes" data_type: TYPE_INT64 dims: [ 3 ] }' in config
    assert '{ name: "probs" data_type: TYPE_FP32 dims: [ 3 ] }' in config


def test_credentials_come_from_forwarded_headers_once():
    params = '{"sealnet-license":"sn1.a.b","x-forwarded-for":"203.0.113.9, 192.0.2.4, 10.0.0.7"}'
    assert credentials(params) == ("sn1.a.b", "")  # no trusted proxy: the header is the client's, ignored
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert credentials(params, proxies=proxies) == ("sn1.a.b", "ipv4:192.0.2.4")  # right-most untrusted entry
    assert credentials('{"sealnet-license":"sn1.a.b","x-forwarded-for":"evil\\nname"}', proxies=proxies) == \
        ("sn1.a.b", "")  # not an address where a proxy wrote one: nobody is named
    assert credentials('{"sealnet-license":"sn1.a.b"}') == ("sn1.a.b", "")
    with pytest.raises(RequestError) as err:
        credentials('{"x-forwarded-for":"a","x-forwarded-for":"b","sealnet-license":"t"}')
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in str(err.value)
    with pytest.raises(RequestError) as err:
        credentials('{"other": 1}')
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and refusal_reason(err.value) == "no_license"
    with pytest.raises(RequestError, match="string"):
        credentials('{"sealnet-license": 5}')
    assert refusal_reason(EnclaveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "lockout: too many")) == "lockout"
    assert refusal_reason(EnclaveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota: used")) == "quota"
    assert refusal_reason(EnclaveError(grpc.StatusCode.PERMISSION_DENIED, "revoked: license x")) == "revoked"


# -- one Triton for the module ------------------------------------------------------------------------------
_REASON = triton_unavailable_reason()
needs_triton = pytest.mark.skipif(_REASON is not None, reason=f"tritonserver cannot run here: {_REASON}")


@pytest.fixture(scope="module")
def deployment(artefacts, dsn_student, passport_bundle, sealed_head):
    keystore = artefacts["keystore"]
    owner = artefacts["owner_key"]
    with tempfile.TemporaryDirectory(prefix="sn-tr-", dir="/tmp") as d, contextlib.ExitStack() as stack:
        root = Path(d)
        os.chmod(root, 0o700)
        bundles = {MODEL_ID: (artefacts["bundle"], "ensemble", PolicyConfig(max_failures=MAX_FAILURES)),
                   DSN_MODEL_ID: (dsn_student["bundle"], "bls", PolicyConfig()),
                   PASSPORT_MODEL_ID: (passport_bundle["bundle"], "inline", PolicyConfig()),
                   SEALED_HEAD_MODEL_ID: (sealed_head["bundle"], "ensemble", PolicyConfig())}
        # per model: a deployment (its trusted module, which a test may kill and restart, and the python engine)
        modules, python_engine = {}, {}
        for i, (model, (bundle, network, policy)) in enumerate(bundles.items()):
            modules[model] = stack.enter_context(LocalDeployment(
                bundle, keystore=keystore, enclave_address=f"unix:{root / f'm{i}.sock'}",
                enclave_options=EnclaveOptions(policy=policy)))
            write_repository(bundle, root / "models", RepoOptions(modules[model].enclave, network=network))
            python_engine[model] = tgrpc.InferenceServerClient(modules[model].endpoint)
        triton = stack.enter_context(TritonServer(root / "models", log_path=root / "triton.log", log_verbose=1))
        tokens = {MODEL_ID: issue_license(owner, customer_id="acme", model_id=MODEL_ID, serial_number="SN-1",
                                          valid_seconds=600),
                  DSN_MODEL_ID: issue_license(owner, customer_id="acme", model_id=DSN_MODEL_ID,
                                              serial_number=dsn_student["serial_number"], valid_seconds=600),
                  PASSPORT_MODEL_ID: issue_license(owner, customer_id="acme", model_id=PASSPORT_MODEL_ID,
                                                   serial_number="SN-1", valid_seconds=600),
                  SEALED_HEAD_MODEL_ID: issue_license(owner, customer_id="acme", model_id=SEALED_HEAD_MODEL_ID,
                                                      serial_number="SN-1", valid_seconds=600)}
        yield {"triton": triton, "modules": modules, "python": python_engine, "tokens": tokens, "root": root,
               "grpc": tgrpc.InferenceServerClient(triton.grpc_url),
               "http": thttp.InferenceServerClient(triton.http_url)}


def _grpc(client, model: str, x: np.ndarray, headers: dict | None) -> dict[str, np.ndarray]:
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], headers=headers)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _http(client, model: str, x: np.ndarray, headers: dict | None, output: str = "logits") -> np.ndarray:
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], headers=headers).as_numpy(output)


@needs_triton
@pytest.mark.parametrize("model", [MODEL_ID, DSN_MODEL_ID, PASSPORT_MODEL_ID, SEALED_HEAD_MODEL_ID])
def test_licensed_http_and_grpc_answer_as_the_python_engine(deployment, digits, model):
    x = digits.x_test[:24]
    headers = {"sealnet-license": deployment["tokens"][model]}
    want = _grpc(deployment["python"][model], model, x, headers)
    got = _grpc(deployment["grpc"], model, x, headers)
    assert list(got) == list(want) == (["label"] if model == SEALED_HEAD_MODEL_ID else ["logits"])
    name = next(iter(want))
    np.testing.assert_allclose(got[name], want[name], atol=1e-4)
    assert got[name].dtype == want[name].dtype
    np.testing.assert_allclose(_http(deployment["http"], model, x, {"Sealnet-License": headers["sealnet-license"]},
                                     name), want[name], atol=1e-4)
    labels = want[name].reshape(-1) if name == "label" else want[name].argmax(1)
    assert float((labels == digits.y_test[:24]).mean()) > 0.7  # the real, licensed answer
    # what perf_analyzer-style tools read: the model's config and its statistics
    config = deployment["grpc"].get_model_config(model).config
    assert config.max_batch_size > 0
    if config.platform == "ensemble":  # the ensemble's models batch: the module step and the public network
        steps = [s.model_name for s in config.ensemble_scheduling.step]
        assert steps[0 if model == SEALED_HEAD_MODEL_ID else 1] == f"{model}-public"
        assert all(deployment["grpc"].get_model_config(s).config.HasField("dynamic_batching") for s in steps)
    else:
        assert config.HasField("dynamic_batching")
    stats = deployment["http"].get_inference_statistics(model)["model_stats"][0]
    assert stats["inference_count"] >= 48 and stats["inference_stats"]["success"]["count"] >= 2


@needs_triton
def test_no_license_and_a_wrong_license_are_refused_with_the_reason(deployment, digits, artefacts):
    x = digits.x_test[:2]
    with pytest.raises(InferenceServerException) as err:
        _grpc(deployment["grpc"], MODEL_ID, x, None)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert without_ensemble_prefix(err.value.message()).startswith("UNAUTHENTICATED: header 'sealnet-license': missing")
    with pytest.raises(InferenceServerException) as err:
        _http(deployment["http"], MODEL_ID, x, None)
    assert err.value.status() == "400" and "UNAUTHENTICATED" in err.value.message()
    token = {"sealnet-license": deployment["tokens"][MODEL_ID]}
    with pytest.raises(InferenceServerException) as err:  # Triton itself checks tensors against the config
        _grpc(deployment["grpc"], MODEL_ID, np.zeros((2, 1, 7, 8), np.float32), token)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "input" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        _grpc(deployment["grpc"], MODEL_ID, np.full((2, 1, 8, 8), np.nan, np.float32), token)
    assert without_ensemble_prefix(err.value.message()).startswith("INVALID_ARGUMENT: inputs[0] (input): contains NaN")
    other = issue_license(artefacts["owner_key"], customer_id="acme", model_id="another-model", serial_number="S",
                          valid_seconds=600)
    with pytest.raises(InferenceServerException) as err:
        _grpc(deployment["grpc"], DSN_MODEL_ID, x, {"sealnet-license": other})
    assert without_ensemble_prefix(err.value.message()).startswith("PERMISSION_DENIED: license:")


@needs_triton
def test_spoofed_forwarded_headers_move_no_counter_and_lock_out_no_valid_license(deployment, digits, artefacts):
    """100 bad licenses from 100 different X-Forwarded-For values (no trusted proxy: the header is ignored, so
    they all count against the one identity they really share, and the spoofing gains no guesses); then a new
    client with a valid license, and the abuser with one, are served at once."""
    x = digits.x_test[:2]
    forged = deployment["tokens"][MODEL_ID][:-4] + "AAAA"
    codes = []
    for i in range(100):
        with pytest.raises(InferenceServerException) as err:
            _grpc(deployment["grpc"], MODEL_ID, x, {"x-forwarded-for": f"203.0.113.{i}", "sealnet-license": forged})
        codes.append(sealnet_status(err.value.message()))
    assert codes == ["PERMISSION_DENIED"] * MAX_FAILURES + ["RESOURCE_EXHAUSTED"] * (100 - MAX_FAILURES)

    def fresh(serial: str) -> str:  # a new license: no session cached in the runtime, so the module decides
        return issue_license(artefacts["owner_key"], customer_id="acme", model_id=MODEL_ID, serial_number=serial,
                             valid_seconds=600)

    started = time.monotonic()
    out = _grpc(deployment["grpc"], MODEL_ID, x, {"x-forwarded-for": "198.51.100.9", "sealnet-license": fresh("SN-2")})
    assert out["logits"].shape == (2, 10) and time.monotonic() - started < 2.0
    out = _grpc(deployment["grpc"], MODEL_ID, x, {"x-forwarded-for": "203.0.113.7", "sealnet-license": fresh("SN-3")})
    assert out["logits"].shape == (2, 10)


@needs_triton
def test_readiness_follows_the_trusted_module(deployment, digits):
    """Module killed: the model and /v2/health/ready read false within 5 s and nothing is answered; module back:
    ready and licensed requests answered within 5 s."""
    triton, module = deployment["triton"], deployment["modules"][SEALED_HEAD_MODEL_ID]
    headers = {"sealnet-license": deployment["tokens"][SEALED_HEAD_MODEL_ID]}
    x = digits.x_test[:4]
    want = _grpc(deployment["grpc"], SEALED_HEAD_MODEL_ID, x, headers)["label"]
    assert triton.ready() and triton.model_ready(SEALED_HEAD_MODEL_ID)
    module.kill_enclave()
    killed = time.monotonic()
    while triton.ready() or triton.model_ready(SEALED_HEAD_MODEL_ID):
        assert time.monotonic() - killed < 5.0, "readiness still true 5 s after the trusted module died"
        time.sleep(0.1)
    with pytest.raises(InferenceServerException):
        _grpc(deployment["grpc"], SEALED_HEAD_MODEL_ID, x, headers)
    module.start_enclave()
    restarted, answer = time.monotonic(), None
    while answer is None:
        assert time.monotonic() - restarted < 5.0, "not ready and answering 5 s after the trusted module returned"
        if triton.ready() and triton.model_ready(SEALED_HEAD_MODEL_ID):
            with contextlib.suppress(InferenceServerException):
                answer = _grpc(deployment["grpc"], SEALED_HEAD_MODEL_ID, x, headers)["label"]
        time.sleep(0.1)
    assert np.array_equal(answer, want)


@needs_triton
def test_module_killed_gives_only_errors_then_service_resumes(deployment, digits):
    x = digits.x_test[:4]
    headers = {"sealnet-license": deployment["tokens"][MODEL_ID]}
    want = _grpc(deployment["python"][MODEL_ID], MODEL_ID, x, headers)["logits"]
    answers, errors, stop = [], [], threading.Event()

    def load():
        client = tgrpc.InferenceServerClient(deployment["triton"].grpc_url)
        while not stop.is_set():
            try:
                answers.append(_grpc(client, MODEL_ID, x, headers)["logits"])
            except InferenceServerException as exc:
                errors.append((exc.status(), exc.message()))

    thread = threading.Thread(target=load)
    thread.start()
    module = deployment["modules"][MODEL_ID]
    try:
        time.sleep(0.5)
        module.kill_enclave()
        time.sleep(1.5)
        down = len(errors)
        module.start_enclave()
        restarted, recovered = time.monotonic(), None
        while time.monotonic() - restarted < 10:
            n = len(answers)
            time.sleep(0.05)
            if len(answers) > n and recovered is None and len(errors) >= down:
                recovered = time.monotonic() - restarted
                break
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    # refused by the protected model (trusted module unavailable) or by Triton (the model taken out of service)
    assert down > 0 and all(status == "StatusCode.UNAVAILABLE" and "trusted module" in message
                            or "unavailable" in message.lower() or "not ready" in message.lower()
                            or "unknown model" in message.lower() or "not found" in message.lower()
                            for status, message in errors)
    assert all(np.allclose(a, want, atol=1e-4) for a in answers)  # never an unprotected answer
    assert recovered is not None and recovered <= 5.0


@needs_triton
def test_metrics_show_triton_and_sealnet_families_without_secrets(deployment, digits):
    _grpc(deployment["grpc"], DSN_MODEL_ID, digits.x_test[:2], {"sealnet-license": deployment["tokens"][DSN_MODEL_ID]})
    with pytest.raises(InferenceServerException):
        _grpc(deployment["grpc"], DSN_MODEL_ID, digits.x_test[:2], None)
    text = urllib.request.urlopen(deployment["triton"].metrics_url, timeout=10).read().decode()
    families = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    assert {"nv_inference_request_success", "nv_inference_count", "nv_inference_queue_duration_us"} <= families
    assert {"sealnet_trusted_module_rpc_duration_us", "sealnet_refusals_total", "sealnet_items_total"} <= families
    refused = re.search(rf'sealnet_refusals_total{{model="{DSN_MODEL_ID}",reason="no_license"}} (\d+)', text)
    assert refused and int(refused.group(1)) >= 1
    assert re.search(rf'sealnet_trusted_module_rpc_duration_us_count{{model="{DSN_MODEL_ID}",rpc="Preprocess"}} '
                     r"[1-9]", text)
    for token in deployment["tokens"].values():
        assert token not in text and token.split(".")[-1] not in text
    assert "sn1." not in text and "x-forwarded-for" not in text


@needs_triton
def test_no_license_or_secret_in_tritons_verbose_log(deployment):
    log = (deployment["root"] / "triton.log").read_text(errors="replace")
    assert "executing" in log  # verbose logging was on and requests were served
    assert "sn1." not in log  # no license token, however cut
    for token in deployment["tokens"].values():
        assert token.split(".")[-1] not in log and token.split(".")[1] not in log


@needs_triton
def test_grpc_mutual_tls_through_tritons_own_flags(deployment, artefacts, digits, tmp_path):
    from sealnet.certs import write_certs

    tls = tmp_path / "tls"
    write_certs(tls, clients=("edge",))
    write_repository(artefacts["bundle"], tmp_path / "models", RepoOptions(deployment["modules"][MODEL_ID].enclave))
    flags = ("--grpc-use-ssl-mutual=true", f"--grpc-server-cert={tls / 'server.crt'}",
             f"--grpc-server-key={tls / 'server.key'}", f"--grpc-root-cert={tls / 'ca.crt'}")
    headers = {"sealnet-license": deployment["tokens"][MODEL_ID]}
    with TritonServer(tmp_path / "models", log_path=tmp_path / "t.log", extra_args=flags) as triton:
        client = tgrpc.InferenceServerClient(triton.grpc_url, ssl=True, root_certificates=str(tls / "ca.crt"),
                                             private_key=str(tls / "client-edge.key"),
                                             certificate_chain=str(tls / "client-edge.crt"))
        assert _grpc(client, MODEL_ID, digits.x_test[:2], headers)["logits"].shape == (2, 10)
        anonymous = tgrpc.InferenceServerClient(triton.grpc_url, ssl=True, root_certificates=str(tls / "ca.crt"))
        with pytest.raises(InferenceServerException):  # no client certificate: the handshake fails
            _grpc(anonymous, MODEL_ID, digits.x_test[:2], headers)


@needs_triton
def test_attestation_failure_stops_tritonserver(deployment, artefacts, tmp_path):
    # the DSN bundle's model pointed at the transform bundle's module: another measurement
    write_repository(artefacts["bundle"], tmp_path / "models",
                     RepoOptions(deployment["modules"][DSN_MODEL_ID].enclave, attest_timeout_s=5))
    with pytest.raises(RuntimeError, match="attestation"):
        TritonServer(tmp_path / "models", log_path=tmp_path / "t.log", ready_timeout=60).start()


@needs_triton
def test_serve_engine_triton_is_ready_only_after_the_module_attests(artefacts, digits, deployment):
    root = deployment["root"]
    address = f"unix:{root / 'cli.sock'}"
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen(sealnet_command("serve", "--engine", "triton", "--bundle", str(artefacts["bundle"]),
                                            "--enclave", address, "--listen", f"127.0.0.1:{grpc_port}",
                                            "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                                            "--triton-log", str(root / "cli-triton.log")),
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    module = None
    try:
        client = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 60
        while f"loading: {MODEL_ID}" not in _read(root / "cli-triton.log"):
            assert proc.poll() is None and time.monotonic() < deadline, _read(root / "serve.log")[-2000:]
            time.sleep(0.2)
        time.sleep(2)  # the protected model waits for the trusted module's attestation, so Triton (which opens its
        assert proc.poll() is None and not _up(client)  # endpoints once every model loaded) answers nothing yet
        module = LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], runtime=False,
                                 enclave_address=address).start()
        deadline = time.monotonic() + 60
        while not (_up(client) and client.is_server_ready()):
            assert proc.poll() is None and time.monotonic() < deadline, _read(root / "serve.log")[-2000:]
            time.sleep(0.2)
        token = issue_license(artefacts["owner_key"], customer_id="acme", model_id=MODEL_ID, serial_number="SN-4",
                              valid_seconds=600)
        assert _http(client, MODEL_ID, digits.x_test[:3], {"sealnet-license": token}).shape == (3, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            if module is not None:
                module.stop()
    assert proc.returncode == 0, _read(root / "serve.log")[-2000:]


def _up(client) -> bool:
    try:
        return client.is_server_live()
    except Exception:
        return False


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@needs_triton
def test_triton_watch_keeps_a_plain_tritonservers_readiness_true(artefacts, short_tmp, tmp_path):
    """`sealnet triton-watch` beside a tritonserver started without sealnet's watch (as in a container)."""
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], runtime=False,
                         enclave_address=f"unix:{short_tmp / 'w.sock'}") as module:
        write_repository(artefacts["bundle"], tmp_path / "models", RepoOptions(module.enclave, attest_timeout_s=60))
        with TritonServer(tmp_path / "models", log_path=tmp_path / "t.log", watch_modules=False) as triton:
            watch = subprocess.Popen(sealnet_command("triton-watch", "--http", triton.http_url, "--repository",
                                                     str(tmp_path / "models")), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            try:
                assert "watching" in watch.stdout.readline()
                module.kill_enclave()
                killed = time.monotonic()
                while triton.ready():
                    assert time.monotonic() - killed < 5.0
                    time.sleep(0.1)
                module.start_enclave()
                restarted = time.monotonic()
                while not (triton.ready() and triton.model_ready(MODEL_ID)):
                    assert time.monotonic() - restarted < 5.0
                    time.sleep(0.1)
            finally:
                watch.send_signal(signal.SIGTERM)
                assert watch.wait(timeout=10) == 0
