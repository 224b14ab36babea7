"""Start tritonserver on a sealnet model repository: `with TritonServer(repo) as triton: ...`.

Where tritonserver comes from, first found:
- `$SEALNET_TRITON_HOME` or the checkout's `.triton/` as `./dev` lays it out: `server/` holds the
  `nvidia-pytriton` wheel (its tritonserver 2.51 with the Python backend), `venv/` the backend's virtualenv;
- a full Triton install (NVIDIA's containers: /opt/tritonserver), with the backend using the system Python.

The Python backend's stub embeds the system libpython3.11 and finds its interpreter as `python3` on PATH, so the
backend virtualenv (made from that same /usr/bin/python3.11) goes first on PATH: a virtualenv of another 3.11
build would mix two standard libraries in one process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sealnet.errors import FailedPrecondition
from sealnet.processes import free_port
from sealnet.runtime.triton.protocol import DEFAULT_CLIENT_HEADER, forward_pattern

log = logging.getLogger("sealnet.runtime.triton")
ROOT = Path(__file__).resolve().parents[3]
SYSTEM_TRITON = Path("/opt/tritonserver")


class TritonUnavailable(FailedPrecondition, RuntimeError):
    """No usable tritonserver on this machine; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    lib_dirs: tuple[Path, ...] = ()
    python_env: Path | None = None  # the Python backend's virtualenv (its bin/ goes first on PATH)

    @classmethod
    def find(cls, home: Path | None = None) -> TritonInstall:
        home = Path(home or os.environ.get("SEALNET_TRITON_HOME") or ROOT / ".triton")
        wheel = home / "server" / "pytriton" / "tritonserver"
        if (wheel / "bin" / "tritonserver").is_file():
            if not (wheel / "backends" / "python" / "triton_python_backend_stub").is_file():
                raise TritonUnavailable(f"{wheel}/backends/python has no triton_python_backend_stub; rerun ./dev")
            venv = home / "venv"
            if not (venv / "bin" / "python3").exists():
                raise TritonUnavailable(f"the Python backend's virtualenv {venv} is missing; rerun ./dev")
            return cls(wheel / "bin" / "tritonserver", wheel / "backends", (home / "server" / "nvidia_pytriton.libs",),
                       venv)
        found = shutil.which("tritonserver")
        binary = Path(found) if found else SYSTEM_TRITON / "bin" / "tritonserver"
        if binary.is_file():
            return cls(binary, binary.resolve().parent.parent / "backends")
        raise TritonUnavailable(f"tritonserver not found (looked in {home} and on PATH): run ./dev, which installs "
                                "it into .triton/, or use NVIDIA's Triton container")

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.lib_dirs), env.get("LD_LIBRARY_PATH", "")])
        if self.python_env is not None:
            env["PATH"] = f"{self.python_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)  # the stub ignores it; the backend's imports come from its virtualenv
        return env


def triton_unavailable_reason() -> str | None:
    """None when a tritonserver is installed and starts here, else why not (for skips and clear errors)."""
    try:
        install = TritonInstall.find()
    except TritonUnavailable as exc:
        return str(exc)
    try:
        out = subprocess.run([str(install.binary), "--help"], env=install.environment(), capture_output=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{install.binary} does not run here: {exc}"
    if b"--model-repository" not in out.stdout + out.stderr:
        return f"{install.binary} does not run here: {(out.stdout + out.stderr)[-300:].decode(errors='replace')}"
    return None


def protected_models(repository: Path) -> dict[str, tuple[str, Path | None]]:
    """The protected models of a sealnet repository: name -> (trusted module address, its mTLS directory)."""
    found = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        text = config.read_text()
        params = dict(re.findall(r'key: "([^"]+)" value: \{ string_value: "([^"]*)" \}', text))
        if "enclave" in params and "bundle" in params:
            found[config.parent.name] = (params["enclave"], Path(params["enclave_tls"]) if params.get("enclave_tls")
                                         else None)
    return found


class TritonHttp:
    """The parts of Triton's HTTP API the readiness watch uses (a running server at `url`, HOST:PORT)."""

    def __init__(self, url: str, load_timeout: float = 180.0):
        self.url, self.load_timeout = url, load_timeout

    def server_ready(self) -> bool:
        """/v2/health/ready: with strict readiness, every loaded model ready."""
        return self._ok("/v2/health/ready")

    def model_ready(self, name: str) -> bool:
        """/v2/models/NAME/ready."""
        return self._ok(f"/v2/models/{name}/ready")

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def repository_call(self, name: str, action: str) -> bool:
        """POST /v2/repository/models/NAME/load|unload (explicit model control); True on success. A load
        blocks until the model is ready or failed."""
        request = urllib.request.Request(f"http://{self.url}/v2/repository/models/{name}/{action}", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.load_timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError) as exc:
            log.info("Triton %s of %s: %s", action, name, exc)
            return False


class ReadinessWatch:
    """Triton's readiness told the truth: while a protected model's trusted module does not answer, the model
    is unloaded and loaded again, so it and /v2/health/ready (strict readiness) read false; its load waits in
    initialize for the module's attestation and turns ready once the module is back. Polls every `interval`."""

    def __init__(self, triton: TritonHttp, models: dict[str, tuple[str, Path | None]], interval: float = 0.5):
        from sealnet.runtime.enclave_client import EnclaveClient

        self.triton, self.interval = triton, interval
        self._probes = {name: EnclaveClient(address, tls_dir=tls, timeout=1.0) for name, (address, tls)
                        in models.items()}
        self._loading: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-readiness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for probe in self._probes.values():
            probe.close()

    def _module_answers(self, name: str) -> bool:
        from sealnet.runtime.errors import EnclaveError

        try:
            self._probes[name].health()
            return True
        except EnclaveError:
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name in self._probes:
                loading = self._loading.get(name)
                if loading is not None and loading.is_alive():
                    continue
                up, ready = self._module_answers(name), self.triton.model_ready(name)
                if ready and not up:
                    log.warning("trusted module of %s unreachable: unloading the model (readiness false)", name)
                    self.triton.repository_call(name, "unload")
                if not ready or not up:
                    self._reload(name)

    def _reload(self, name: str) -> None:
        """Load `name` in the background (its initialize waits for the module); one load at a time per model."""
        thread = threading.Thread(target=self.triton.repository_call, args=(name, "load"), daemon=True)
        self._loading[name] = thread
        thread.start()


class TritonServer:
    """tritonserver as a child process on `repository`, ready (all models loaded, so every protected model has
    attested its trusted module) when `start()` / `__enter__` returns. Ports 0 pick free ones. Models are under
    explicit control, so the ReadinessWatch can take a protected model out of service while its trusted module
    is down (`watch_modules=False`: never)."""

    def __init__(self, repository: Path, *, install: TritonInstall | None = None, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0, log_path: Path | None = None,
                 log_verbose: int = 0, model_config_name: str | None = None,
                 client_header: str = DEFAULT_CLIENT_HEADER, extra_args: tuple[str, ...] = (),
                 ready_timeout: float = 180.0, stub_timeout_s: int = 120, watch_modules: bool = True):
        self.repository = Path(repository)
        self.install = install or TritonInstall.find()
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = (p or free_port() for p in (grpc_port, http_port,
                                                                                         metrics_port))
        self.log_path = Path(log_path) if log_path else self.repository.parent / "tritonserver.log"
        self.log_verbose = log_verbose
        self.model_config_name = model_config_name
        self.client_header = client_header
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.stub_timeout_s = stub_timeout_s
        self.process: subprocess.Popen | None = None
        self.watch: ReadinessWatch | None = None
        self._watch_modules = watch_modules

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self) -> list[str]:
        pattern = forward_pattern(self.client_header)
        cmd = [str(self.install.binary), f"--model-repository={self.repository.resolve()}",
               f"--backend-directory={self.install.backend_dir}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               f"--grpc-header-forward-pattern={pattern}", f"--http-header-forward-pattern={pattern}",
               # unique shared-memory names: several servers (tests, benchmarks) may run on one host
               f"--backend-config=python,shm-region-prefix-name=sealnet{os.getpid()}_{self.grpc_port}_",
               # the protected model's initialize waits for the trusted module's attestation
               f"--backend-config=python,stub-timeout-seconds={self.stub_timeout_s}",
               "--exit-timeout-secs=5", "--strict-readiness=true", "--exit-on-error=true",
               "--model-control-mode=explicit", "--load-model=*",
               f"--log-verbose={self.log_verbose}"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd + list(self.extra_args)

    def start(self) -> TritonServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.install.environment(), start_new_session=True)
        try:
            self.wait_ready()
            models = protected_models(self.repository) if self._watch_modules else {}
            if models:
                self.watch = ReadinessWatch(TritonHttp(self.http_url, self.ready_timeout), models)
                self.watch.start()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        """Triton's /v2/health/ready: all models loaded (protected ones attested their trusted module)."""
        return TritonHttp(self.http_url).server_ready()

    def model_ready(self, name: str) -> bool:
        return TritonHttp(self.http_url).model_ready(name)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}) during start-up:\n"
                                   f"{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL of its process group if it lingers."""
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
