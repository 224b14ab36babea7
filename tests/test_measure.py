"""The measurement covers what the trusted module's process runs: started as `sealnet enclave` (a real
process), it reports every module it loaded; each project file among them is measured, each third-party file
belongs to a measured distribution, and nothing from the runtime (or training, export, CLIs) is loaded."""

from __future__ import annotations

import json
import signal
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from sealnet.bundle import EXPECTED_MEASUREMENTS, core_digest, load_bundle
from sealnet.enclave_sim.measure import _ROOT, PROJECT_PACKAGES, _installed, measurement_chain
from sealnet.licenses import issue_license
from sealnet.runtime.attestation import attest, load_expected
from sealnet.runtime.enclave_client import EnclaveClient
from tests.conftest import MODEL_ID


def _owning_distribution(path: Path) -> str | None:
    _, owner = _installed()
    for base in {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]}:
        if path.is_relative_to(base) and (name := owner.get(path.relative_to(base).as_posix())):
            return name
    return None


def test_module_process_loads_only_measured_code(artefacts, digits, short_tmp):
    sock, report = short_tmp / "e.sock", short_tmp / "modules.json"
    proc = subprocess.Popen([sys.executable, "-m", "sealnet", "enclave", "--bundle", str(artefacts["bundle"]),
                             "--keystore-dir", str(artefacts["keystore"].directory), "--listen", f"unix:{sock}",
                             "--state-dir", str(short_tmp / "state"), "--report-modules", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "trusted module serving" in line, line + proc.stdout.read()
        client = EnclaveClient(f"unix:{sock}")
        try:  # export's expected measurements = what the module measured at start; then exercise a session
            attest(client, load_expected(artefacts["bundle"] / EXPECTED_MEASUREMENTS))
            token = issue_license(artefacts["owner_key"], customer_id="c", model_id=MODEL_ID, serial_number="s",
                                  valid_seconds=600)
            assert client.preprocess(token, digits.x_test[:2]).shape == digits.x_test[:2].shape
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    loaded = [Path(f) for f in json.loads(report.read_text())]
    measured = {m.name for m in measurement_chain(core_digest(load_bundle(artefacts["bundle"]).manifest))[0]}
    root = _ROOT.resolve()
    project = [f.relative_to(root).as_posix() for f in loaded
               if f.is_relative_to(root) and f.relative_to(root).parts[0] in PROJECT_PACKAGES]
    assert "sealnet/enclave_sim/service.py" in project and "sealnet/_grpc/enclave_pb2.py" in project
    assert [f for f in project if f"code:{f}" not in measured] == []
    assert [f for f in project if not f.startswith(("enclave_sim/", "sealnet/"))] == []  # no runtime/ etc.
    assert [f for f in project if f.startswith("sealnet/") and "cli" in f] == []
    stdlib = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")]
    unmeasured = []
    for f in loaded:
        if (f.is_relative_to(root) and f.relative_to(root).parts[0] in PROJECT_PACKAGES) or \
                any(f.is_relative_to(s) and "site-packages" not in f.parts for s in stdlib):
            continue
        dist = _owning_distribution(f)
        if dist is None or not any(m.startswith(f"dist:{dist}==") for m in measured):
            unmeasured.append(str(f))
    assert unmeasured == [], unmeasured
