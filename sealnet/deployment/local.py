"""One way to start a deployment: the trusted module and the KServe v2 endpoint for a bundle, in this process
(threads: fast, for tests and evaluations) or as `sealnet enclave` / `sealnet serve` child processes (logs in the
work directory: the demo, the benchmark and the attack suite), with the python or the Triton engine.

    with LocalDeployment(bundle, keystore=spec) as d:                          # an exported bundle
        d.client.infer(x, token)
    with LocalDeployment.export(checkpoint, workdir, processes=True) as d:     # export first, with a fresh owner key
        d.accuracy(x, y, d.license("acme", "SN-1"))

Everything started is stopped on exit, also when start-up fails half way; a failed start raises
DeploymentError naming the service that failed (and, for a process, the tail of its log).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.bundle import PUBLIC_ONNX, load_bundle
from sealnet.enclave_sim.keystore import init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.enclave_sim.policy import PolicyConfig
from sealnet.enclave_sim.service import EnclaveOptions
from sealnet.errors import Unavailable
from sealnet.licenses import issue_license, load_owner_key, write_owner_key
from sealnet.onnx_session import ort_accuracy, ort_session
from sealnet.processes import free_port, sealnet_command, start_logged, stop_all
from sealnet.runtime.batching import DEFAULT_BATCHING, BatchingConfig
from sealnet.runtime.client import InferenceClient

ENGINES = ("python", "triton")
_LOG_TAIL_CHARS = 3000


class DeploymentError(Unavailable, RuntimeError):
    """A service of a LocalDeployment did not start; the message names it (and quotes its log's tail)."""


def log_tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file ('' when there is none)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


class LocalDeployment:
    """The trusted module and the endpoint for an exported `bundle`, started on entering, stopped on exit.

    keystore: the KeystoreSpec the bundle is sealed to. owner_key (private key or its file): lets `license()`
    issue licenses. processes: run `sealnet enclave` / `sealnet serve` as child processes, logs in
    WORKDIR/logs/ (WORKDIR: `workdir`, else a temporary one); otherwise both serve from threads of this process
    and `module` / `service` are the server objects. engine "triton" runs `sealnet serve --engine triton` (needs
    processes). runtime=False starts the trusted module alone. enclave_options: the module's settings (policy,
    revocations, audit log, state dir: for processes WORKDIR/state unless given). batching, attest_timeout,
    expected_measurements, triton_network: the endpoint's. enclave_address: unix:PATH (default: a short private
    directory in /tmp); listen: the endpoint's HOST:PORT (default loopback, a free port).
    """

    def __init__(self, bundle: Path, *, keystore: KeystoreSpec, owner_key: Ed25519PrivateKey | Path | None = None,
                 workdir: Path | None = None, processes: bool = False, engine: str = "python", runtime: bool = True,
                 enclave_options: EnclaveOptions | None = None, batching: BatchingConfig | None = DEFAULT_BATCHING,
                 attest_timeout: float = 60.0, expected_measurements: Path | None = None,
                 triton_network: str = "inline", enclave_address: str | None = None, listen: str | None = None,
                 ready_timeout: float = 60.0, manifest: dict[str, Any] | None = None,
                 _resources: contextlib.ExitStack | None = None):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if engine == "triton" and not processes:
            raise ValueError("engine 'triton' runs `sealnet serve --engine triton`: it needs processes=True")
        self.bundle = Path(bundle)
        self.keystore = keystore
        self.owner_key = load_owner_key(owner_key) if isinstance(owner_key, str | Path) else owner_key
        self.processes, self.engine, self.runtime = processes, engine, runtime
        self.enclave_options = enclave_options or EnclaveOptions()
        self.batching, self.attest_timeout = batching, attest_timeout
        self.expected_measurements, self.triton_network = expected_measurements, triton_network
        self.ready_timeout = ready_timeout
        self._workdir = Path(workdir) if workdir is not None else None
        self._enclave_address = enclave_address
        self._listen = listen
        self._manifest = manifest
        # What export() made (temporary work dir, software TPM) belongs to this deployment from the start.
        self._stack = _resources or contextlib.ExitStack()
        self._started = False
        self.enclave: str = ""  # unix:PATH of the trusted module
        self.endpoint: str = ""  # HOST:PORT a client dials
        self.port = 0
        self.http_address: str | None = None  # Triton's HTTP/REST endpoint (engine triton)
        self.metrics_url: str | None = None  # Triton's Prometheus metrics (engine triton)
        self.client: InferenceClient | None = None
        self.module = None  # in-process: the TrustedModule
        self.enclave_server = None  # in-process: its grpc.Server
        self.service = None  # in-process: the runtime's InferenceService
        self.runtime_server = None  # in-process: the RuntimeServer
        self._enclave_proc: subprocess.Popen | None = None
        self._runtime_proc: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self._enclave_starts = 0
        self._enclave_log = self._runtime_log = Path()

    # -- export then deploy -------------------------------------------------------------------------------------
    @classmethod
    def export(cls, checkpoint: Path, workdir: Path | None = None, *, keystore: str | KeystoreSpec = "embedded",
               model_id: str | None = None, data_dir: Path | None = None, log=lambda *_: None,
               **options) -> LocalDeployment:
        """Export `checkpoint` into WORKDIR/bundle with a fresh owner key (WORKDIR/owner.key) and keystore
        ("embedded": a new one in WORKDIR/keystore; "tpm": a software TPM started in WORKDIR/swtpm and stopped
        with the deployment; or a KeystoreSpec), and return the deployment of that bundle, to enter at once.
        WORKDIR: `workdir`, else a temporary directory removed on exit. `options`: those of LocalDeployment."""
        from sealnet.export.build_engine import build_bundle

        stack = contextlib.ExitStack()
        try:
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sn-deploy-", dir="/tmp")))
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            spec = _export_keystore(keystore, workdir, stack, log)
            key_path, _ = write_owner_key(workdir / "owner.key")
            manifest = build_bundle(checkpoint, workdir / "bundle", owner_key=key_path, keystore=spec,
                                    model_id=model_id, data_dir=data_dir, force=True, log=log)
            return cls(workdir / "bundle", keystore=spec, owner_key=load_owner_key(key_path), workdir=workdir,
                       manifest=manifest, _resources=stack, **options)
        except BaseException:
            stack.close()
            raise

    # -- what callers read --------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = load_bundle(self.bundle).manifest
        return self._manifest

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def workdir(self) -> Path | None:
        """Where the export, the logs and (for processes) the module's state go; None for threads without one."""
        return self._workdir

    @property
    def logs(self) -> Path | None:
        """The child processes' logs (enclave.log, runtime.log, tritonserver.log)."""
        return self._workdir / "logs" if self._workdir is not None else None

    def license(self, customer_id: str = "eval", serial_number: str = "SN-EVAL", model_id: str | None = None,
                valid_seconds: int = 3600) -> str:
        if self.owner_key is None:
            raise ValueError("this deployment has no owner key: pass owner_key= to issue licenses")
        return issue_license(self.owner_key, customer_id=customer_id, model_id=model_id or self.model_id,
                             serial_number=serial_number, valid_seconds=valid_seconds)

    def predict(self, x: np.ndarray, token: str | None, batch: int = 100) -> np.ndarray:
        """Logits over gRPC; raises grpc.RpcError when the endpoint refuses."""
        return np.concatenate([self.client.infer(x[i : i + batch], token) for i in range(0, len(x), batch)])

    def accuracy(self, x: np.ndarray, y: np.ndarray, token: str | None) -> float | str:
        """Accuracy over gRPC, or the gRPC status name when the endpoint refuses."""
        try:
            labels = [self.client.predict_labels(x[i : i + 100], token) for i in range(0, len(x), 100)]
            return float((np.concatenate(labels) == y).mean())
        except grpc.RpcError as exc:
            return exc.code().name

    def public_onnx_accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """What a copy of public.onnx alone gives on raw inputs (shipped parameters, no trusted module)."""
        return ort_accuracy(ort_session(self.bundle / PUBLIC_ONNX), x, y)

    def alive(self) -> dict[str, bool]:
        """Service name -> still running (for processes: the process has not exited)."""
        if self.processes:
            return {"enclave": self._enclave_proc is not None and self._enclave_proc.poll() is None,
                    "runtime": self._runtime_proc is not None and self._runtime_proc.poll() is None}
        return {"enclave": self.enclave_server is not None, "runtime": self.runtime_server is not None}

    # -- start and stop -----------------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalDeployment:
        if self._started:
            raise RuntimeError("this deployment was started already")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every service and release what export made; safe to call more than once."""
        self._stack.close()

    def _start(self) -> None:
        if self._enclave_address is None:
            sock_dir = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))  # Unix socket paths are limited to ~100 bytes
            os.chmod(sock_dir, 0o700)
            self._stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)
            self._enclave_address = f"unix:{sock_dir / 'enclave.sock'}"
        self.enclave = self._enclave_address
        if self.processes:
            if self._workdir is None:
                self._workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="sn-deploy-",
                                                                                             dir="/tmp")))
            self.logs.mkdir(parents=True, exist_ok=True)
            self._stack.callback(lambda: stop_all(self._procs))
        self._stack.callback(self._stop_threads)
        self.start_enclave(wait=not self.runtime)
        if not self.runtime:
            return
        if self.processes:
            self._start_runtime_process()
        else:
            self._start_runtime_thread()
        self.client = InferenceClient(self.endpoint, self.model_id)
        self._stack.callback(self.client.close)
        self._wait_ready()

    # -- the trusted module ---------------------------------------------------------------------------------------
    def start_enclave(self, *, wait: bool = True) -> None:
        """Start the trusted module (again, after kill_enclave) on the deployment's address."""
        self._enclave_starts += 1
        if not self.processes:
            from sealnet.enclave_sim import service as enclave_service

            try:
                self.enclave_server, self.module = enclave_service.serve(self.bundle, self.enclave, self.keystore,
                                                                         self.enclave_options)
            except Exception as exc:
                raise DeploymentError(f"trusted module did not start for {self.bundle}: {exc}") from exc
            return
        n = self._enclave_starts
        log = self.logs / ("enclave.log" if n == 1 else f"enclave.{n}.log")
        self._enclave_proc = start_logged(sealnet_command("enclave", *self._enclave_args()), log)
        self._enclave_log = log
        self._procs.append(self._enclave_proc)
        if wait:
            self._wait(lambda: self._enclave_answers(), "trusted module")

    def kill_enclave(self) -> None:
        """The trusted module dies at once: SIGKILL for a process (a crash, not a clean shutdown), an immediate
        stop of its server in this process."""
        if self._enclave_proc is not None:
            self._enclave_proc.kill()
            self._enclave_proc.wait()
        if self.enclave_server is not None:
            self.enclave_server.stop(0).wait()
            self.enclave_server = None
            self.module.close()

    def _enclave_args(self) -> list[str]:
        o, spec = self.enclave_options, self.keystore
        args = ["--bundle", str(self.bundle), "--listen", self.enclave,
                "--state-dir", str(o.state_dir or self.workdir / "state")]
        if spec.backend == "tpm":
            args += ["--keystore", "tpm", "--tpm", spec.tcti or ""]
        elif spec.directory is not None:
            args += ["--keystore-dir", str(spec.directory)]
        for flag, value in (("--revocations", o.revocations), ("--audit-log", o.audit_log), ("--tls-dir", o.tls_dir)):
            if value is not None:
                args += [flag, str(value)]
        default, policy = EnclaveOptions(), o.policy
        if policy != PolicyConfig():
            args += ["--max-failures", str(policy.max_failures), "--lockout-window", str(policy.window_s),
                     "--max-bad-attempts", str(policy.max_bad_attempts), "--quota-items", str(policy.quota_items),
                     "--quota-window", str(policy.quota_window_s)]
        if o.workers != default.workers:
            args += ["--workers", str(o.workers)]
        for name in o.forwarders:
            if name not in default.forwarders:
                args += ["--forwarder", name]
        if o.audit_max_bytes != default.audit_max_bytes:
            args += ["--audit-max-mb", repr(o.audit_max_bytes / (1 << 20))]
        if o.audit_keep != default.audit_keep:
            args += ["--audit-keep", str(o.audit_keep)]
        return args

    def _enclave_answers(self) -> bool:
        from sealnet.runtime.enclave_client import EnclaveClient

        try:
            client = EnclaveClient(self.enclave, timeout=2, tls_dir=self.enclave_options.tls_dir)
        except ValueError:
            return False
        try:
            client.health()
            return True
        except Exception:  # unreachable yet
            return False
        finally:
            client.close()

    # -- the endpoint ---------------------------------------------------------------------------------------------
    def _start_runtime_thread(self) -> None:
        from sealnet.runtime import server as runtime_server

        try:
            self.runtime_server, self.service = runtime_server.serve(
                self.bundle, self._listen or "127.0.0.1:0", self.enclave, batching=self.batching,
                expected_measurements=self.expected_measurements, attest_timeout=self.attest_timeout,
                enclave_tls=self.enclave_options.tls_dir)
        except Exception as exc:
            raise DeploymentError(f"endpoint (KServe v2 runtime) did not start for {self.bundle}: {exc}") from exc
        self.port = self.service.port
        self.endpoint = _dial(self._listen or "127.0.0.1:0", self.port)

    def _start_runtime_process(self) -> None:
        host, _, port = (self._listen or "127.0.0.1:0").rpartition(":")
        self.port = int(port) or free_port()
        listen = f"{host}:{self.port}"
        self.endpoint = _dial(listen, self.port)
        args = ["--bundle", str(self.bundle), "--enclave", self.enclave, "--listen", listen]
        if self.enclave_options.tls_dir is not None:
            args += ["--enclave-tls", str(self.enclave_options.tls_dir)]
        if self.attest_timeout != 60.0:
            args += ["--attest-timeout", str(self.attest_timeout)]
        if self.expected_measurements is not None:
            args += ["--expected-measurements", str(self.expected_measurements)]
        if self.batching is None:
            args.append("--no-batching")
        elif self.batching != DEFAULT_BATCHING:
            b = self.batching
            args += ["--max-batch-size", str(b.max_batch), "--max-queue-delay-ms", str(b.max_queue_delay_ms),
                     "--batch-workers", str(b.workers), "--max-queued-items", str(b.max_queued_items)]
        if self.engine == "triton":
            http_port, metrics_port = free_port(), free_port()
            self.http_address = f"{host}:{http_port}"
            self.metrics_url = f"http://{host}:{metrics_port}/metrics"
            args += ["--engine", "triton", "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                     "--triton-log", str(self.logs / "tritonserver.log"), "--triton-network", self.triton_network]
        self._runtime_log = self.logs / "runtime.log"
        self._runtime_proc = start_logged(sealnet_command("serve", *args), self._runtime_log)
        self._procs.insert(0, self._runtime_proc)  # stopped first

    def _wait_ready(self) -> None:
        def ready() -> bool:
            try:
                self.client.wait_ready(timeout=0.5)
                return True
            except TimeoutError:
                return False

        self._wait(ready, f"endpoint {self.endpoint}")

    def _wait(self, ready, what: str) -> None:
        """Poll `ready` until it holds; DeploymentError when a child process exits or `ready_timeout` passes."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            for name, proc, log in self._children():
                if proc.poll() is not None:
                    raise DeploymentError(f"{name} exited with status {proc.returncode} during start-up; the end of "
                                          f"{log}:\n{log_tail(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        detail = ""
        if self.processes:
            module = "answers" if self._enclave_answers() else "does not answer"
            detail = f" (the trusted module {module}); logs in {self.logs}"
            for name, _, log in self._children():
                detail += f"\n--- the end of {name}'s log {log}:\n{log_tail(log, 1500)}"
        raise DeploymentError(f"{what} not ready after {self.ready_timeout:.0f} s{detail}")

    def _children(self) -> list[tuple[str, subprocess.Popen, Path]]:
        out = []
        if self._enclave_proc is not None:
            out.append(("trusted module (sealnet enclave)", self._enclave_proc, self._enclave_log))
        if self._runtime_proc is not None:
            out.append((f"endpoint (sealnet serve --engine {self.engine})", self._runtime_proc, self._runtime_log))
        return out

    def _stop_threads(self) -> None:
        if self.runtime_server is not None:
            self.runtime_server.stop(0)
            self.runtime_server = None
        if self.enclave_server is not None:
            self.enclave_server.stop(0)
            self.enclave_server = None
            self.module.close()


def _dial(listen: str, port: int) -> str:
    """The address a local client dials for a server listening on `listen` (wildcard hosts: loopback)."""
    if listen.startswith("unix:"):
        return listen
    host = listen.rpartition(":")[0]
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"


def _export_keystore(keystore: str | KeystoreSpec, workdir: Path, stack: contextlib.ExitStack, log) -> KeystoreSpec:
    """The keystore export seals to: a KeystoreSpec as given, a new embedded one, or a software TPM."""
    if isinstance(keystore, KeystoreSpec):
        return keystore
    if keystore == "embedded":
        init_keystore(workdir / "keystore")
        return KeystoreSpec("embedded", workdir / "keystore")
    if keystore == "tpm":
        from sealnet.enclave_sim.swtpm import SwtpmProcess, swtpm_unavailable

        if reason := swtpm_unavailable():
            raise DeploymentError(f"keystore tpm needs a software TPM: {reason}")
        tpm = stack.enter_context(SwtpmProcess(workdir / "swtpm"))
        log(f"software TPM (swtpm) on {tpm.tcti}")
        return KeystoreSpec("tpm", tcti=tpm.tcti)
    raise ValueError(f"keystore {keystore!r}: 'embedded', 'tpm' or a KeystoreSpec")

