"""An edge host installs `pip install sealnet` (no extras): the wheel holds only the sealnet package, and a
fresh virtualenv with it and its core dependencies (no torch, matplotlib, scikit-learn or mlxtend) runs the
trusted module and the endpoint for a real bundle, while the training commands exit 3 naming the extra.

The bundle is exported here (the dev environment has torch) with the project's export, but sealed to the
measurements of the edge virtualenv's trusted module: the module measures its interpreter and installed
distributions (enclave_sim/measure.py), which differ between the two environments, so secrets sealed to the
dev environment's chain would not unseal there. The edge interpreter computes those measurements itself with
the same function (it is torch-free), and export seals to them and writes them as expected-measurements.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from sealnet.evidence import Measurement
from sealnet.licenses import issue_license
from sealnet.runtime.client import InferenceClient
from tests.conftest import MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("torch", "matplotlib", "sklearn", "mlxtend")
# pip's words for "no index reachable": then the test skips instead of failing
OFFLINE = re.compile(r"Could not find a version|No matching distribution|Failed to establish a new connection|"
                     r"Temporary failure in name resolution|Network is unreachable|ConnectTimeout|ReadTimeout|"
                     r"ProxyError|Connection refused|Max retries exceeded")
# What the serving commands import (their functions import lazily, so import those modules too): with no torch
# installed, any import of it would fail here. (runtime/triton/backend.py and public.py run inside Triton.)
SERVING_IMPORTS = """import importlib, sys
for name in ("sealnet.cli.main", "sealnet.enclave_sim.__main__", "sealnet.runtime.server", "sealnet.runtime.client",
             "sealnet.runtime.attestation", "sealnet.runtime.triton.cli", "sealnet.runtime.triton.repo",
             "sealnet.runtime.triton.server", "sealnet.licenses", "sealnet.enclave_sim.keystore", "sealnet.certs"):
    importlib.import_module(name)
sys.modules["sealnet.cli.main"].build_parser()
print([m for m in ("torch", "matplotlib", "sklearn", "mlxtend") if m in sys.modules])
"""
EDGE_MEASURE = """import json, sys
from sealnet.enclave_sim.measure import measurement_chain
items, chain = measurement_chain(bytes.fromhex(sys.argv[1]))
print(json.dumps({"chain": chain.hex(), "measurements": [[m.name, m.sha256.hex()] for m in items]}))
"""


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> dict:
    """The wheel built from this tree and a fresh virtualenv (no system site packages) with it installed."""
    root = tmp_path_factory.mktemp("edge")
    src = root / "src"  # a copy, so that the build leaves no build/ or *.egg-info in the working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sealnet", src / "sealnet", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(root / "dist")]
    if importlib.util.find_spec("setuptools"):  # the dev venv's setuptools: no build dependencies to download
        build.append("--no-build-isolation")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(XDG_STATE_HOME=str(root / "state"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = _run(build, env, root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (root / "dist").glob("sealnet-*.whl")
    venv = root / "venv"
    done = _run([sys.executable, "-m", "venv", str(venv)], env, root)
    assert done.returncode == 0, done.stdout + done.stderr
    done = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], env, root, timeout=600)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if OFFLINE.search(output):
            pytest.skip(f"pip cannot install sealnet's core dependencies from an index here: "
                        f"{output.strip().splitlines()[-1]}")
        pytest.fail(output)
    return {"root": root, "wheel": wheel, "venv": venv, "python": str(venv / "bin" / "python"),
            "sealnet": str(venv / "bin" / "sealnet"), "env": env}


def test_the_wheel_holds_only_the_sealnet_package(edge):
    with zipfile.ZipFile(edge["wheel"]) as whl:
        names = whl.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert whl.read(top_level).decode().split() == ["sealnet"]
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"sealnet", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    assert "sealnet/runtime/triton/requirements-backend.txt" in names and "sealnet/_grpc/enclave_pb2.py" in names


def test_the_edge_install_has_no_torch_and_its_service_commands_start(edge):
    cwd = edge["root"]
    assert _run([edge["python"], "-c", "import torch"], edge["env"], cwd).returncode != 0
    found = _run([edge["python"], "-c", "import importlib.util as u, sys; "
                  f"print(' '.join(m for m in {OPTIONAL!r} if u.find_spec(m)))"], edge["env"], cwd)
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    imported = _run([edge["python"], "-P", "-c", SERVING_IMPORTS], edge["env"], cwd)
    assert imported.returncode == 0 and imported.stdout.split() == ["[]"], imported.stdout + imported.stderr
    for command in (["enclave", "--help"], ["serve", "--help"], ["protect", "--help"], ["license", "--help"],
                    ["keystore", "--help"], ["attest", "--help"], ["infer", "--help"], ["triton-repo", "--help"]):
        done = _run([edge["sealnet"], *command], edge["env"], cwd)
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stdout + done.stderr)
    key = cwd / "owner.key"
    for command in (["license", "keygen", str(key), "--force"], ["keystore", "init", str(cwd / "keystore")],
                    ["license", "issue", "--owner-key", str(key), "--customer", "c", "--model", "m", "--serial", "s"]):
        done = _run([edge["sealnet"], *command], edge["env"], cwd)
        assert done.returncode == 0, (command, done.stdout + done.stderr)


def test_training_commands_exit_3_naming_the_extra(edge, artefacts):
    cwd = edge["root"]
    for command in (["protect", "transform", "--dataset", "digits", "--epochs", "1", "--out", str(cwd / "x.pt")],
                    ["export", str(artefacts["checkpoint_path"]), str(cwd / "never"), "--owner-key",
                     str(artefacts["owner_key_path"]), "--keystore-dir", str(artefacts["keystore"].directory)]):
        done = _run([edge["sealnet"], *command], edge["env"], cwd)
        assert done.returncode == 3, (command, done.stdout + done.stderr)
        assert f"error: `sealnet {command[0]}` needs" in done.stderr and "pip install 'sealnet[train]'" in done.stderr
        assert "Traceback" not in done.stderr


class _Lines:
    """A child's output, read on a thread so that waiting for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in the output:\n{''.join(self.seen)}")


def test_the_edge_install_serves_an_exported_bundle(edge, artefacts, digits, short_tmp, monkeypatch):
    from sealnet.export import build_engine

    def measured_on_edge(manifest_digest: bytes) -> tuple[list[Measurement], bytes]:
        done = _run([edge["python"], "-P", "-c", EDGE_MEASURE, manifest_digest.hex()], edge["env"], edge["root"])
        assert done.returncode == 0, done.stdout + done.stderr
        measured = json.loads(done.stdout)
        return ([Measurement(name, bytes.fromhex(digest)) for name, digest in measured["measurements"]],
                bytes.fromhex(measured["chain"]))

    monkeypatch.setattr(build_engine, "measurement_chain", measured_on_edge)
    bundle = edge["root"] / "bundle"
    build_engine.build_bundle(artefacts["checkpoint_path"], bundle, owner_key=artefacts["owner_key_path"],
                              keystore=artefacts["keystore"], model_id=MODEL_ID, force=True, log=lambda *_: None)
    enclave_sock, runtime_sock = short_tmp / "e.sock", short_tmp / "r.sock"
    procs = []
    try:
        for command, ready in (
            (["enclave", "--bundle", str(bundle), "--keystore-dir", str(artefacts["keystore"].directory),
              "--listen", f"unix:{enclave_sock}", "--state-dir", str(short_tmp / "state")], "trusted module serving"),
            (["serve", "--bundle", str(bundle), "--enclave", f"unix:{enclave_sock}", "--listen",
              f"unix:{runtime_sock}", "--providers", "cpu"], "KServe v2 endpoint"),
        ):
            proc = subprocess.Popen([edge["sealnet"], *command], env=edge["env"], cwd=edge["root"], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            _Lines(proc).wait_for(ready)
        token = issue_license(artefacts["owner_key"], customer_id="edge", model_id=MODEL_ID,
                              serial_number="sn-edge", valid_seconds=600)
        client = InferenceClient(f"unix:{runtime_sock}", MODEL_ID)
        try:
            client.wait_ready(30)
            x, y = digits.x_test[:60], digits.y_test[:60]
            accuracy = float(np.mean(client.predict_labels(x, token) == y))
            assert accuracy > 0.5, accuracy  # chance is 0.1; the fixture's model is well above it with the module
            with pytest.raises(grpc.RpcError) as refused:
                client.predict_labels(x[:2], None)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
