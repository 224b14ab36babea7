"""`sealnet attack --demo`: a target to try the suite on with one command.

Builds the demo's Generator-protected bundle on the embedded MNIST data (the same steps as `sealnet demo`),
starts its own trusted module (Unix socket, with a revocation list) and runtime (loopback) as child processes,
and hands the suite a Target that may kill the module it started. Nothing outside this is ever killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sealnet.attacks.base import Target
from sealnet.data import mnist_embedded
from sealnet.enclave_sim.keystore import init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license, load_owner_key, write_owner_key
from sealnet.processes import DEMO_MODEL_ID as MODEL_ID
from sealnet.processes import SEALED_HEAD_DEMO_MODEL_ID, free_port, sealnet_command, start_logged, stop_all
from sealnet.protect.pipeline import protect_transform
from sealnet.protect.sealed_head import protect_demo_sealed_head
from sealnet.protect.train import TrainConfig
from sealnet.runtime.client import InferenceClient

REVOKED_SERIAL = "SN-REVOKED"


@contextlib.contextmanager
def demo_target(workdir: Path, *, epochs: int = 8, seed: int = 0, method: str = "transform",
                log=print) -> Iterator[Target]:
    """Train + export the demo bundle into `workdir` (replaced), serve it, yield the target, stop the services.
    `method`: "transform" (the Generator-protected CNN) or "sealed-head" (public backbone + sealed head)."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    data = mnist_embedded(seed=0)
    if method == "sealed-head":
        log(f"== demo target: public backbone (8x8 digits) + sealed head ({epochs}-epoch teacher), embedded MNIST")
        protect_demo_sealed_head(data, workdir, epochs=epochs, seed=seed, log=log)
        model_id = SEALED_HEAD_DEMO_MODEL_ID
    else:
        log(f"== demo target: train the Generator-protected CNN ({epochs} epochs) on the embedded MNIST subset")
        protect_transform(data, "generator", workdir / "protected.pt", TrainConfig(epochs=epochs, seed=seed))
        model_id = MODEL_ID
    owner_key_path, _ = write_owner_key(workdir / "owner.key")
    owner_key = load_owner_key(owner_key_path)
    valid = issue_license(owner_key, customer_id="tester", model_id=model_id, serial_number="SN-TESTER",
                          valid_seconds=4 * 3600)
    revoked = issue_license(owner_key, customer_id="former", model_id=model_id, serial_number=REVOKED_SERIAL,
                            valid_seconds=4 * 3600)
    (workdir / "revoked.txt").write_text(f"# revoked for the attack suite\n{REVOKED_SERIAL}\n")
    init_keystore(workdir / "keystore")
    build_bundle(workdir / "protected.pt", workdir / "bundle", owner_key=owner_key_path,
                 keystore=KeystoreSpec("embedded", workdir / "keystore"), model_id=model_id, log=log)

    sock_dir = Path(tempfile.mkdtemp(prefix="sealnet-attack-", dir="/tmp"))  # Unix socket paths must be short
    os.chmod(sock_dir, 0o700)
    enclave_addr = f"unix:{sock_dir / 'enclave.sock'}"
    endpoint = f"127.0.0.1:{free_port()}"
    log(f"== demo target: trusted module on {enclave_addr}, runtime on {endpoint} (logs in {workdir / 'logs'})")
    logs = workdir / "logs"
    procs = [
        start_logged(sealnet_command("enclave", "--bundle", str(workdir / "bundle"), "--keystore-dir",
                                     str(workdir / "keystore"), "--listen", enclave_addr, "--state-dir",
                                     str(workdir / "state"), "--revocations", str(workdir / "revoked.txt"),
                                     "--audit-log", str(logs / "audit.jsonl")), logs / "enclave.log"),
        start_logged(sealnet_command("serve", "--bundle", str(workdir / "bundle"), "--enclave", enclave_addr,
                                     "--listen", endpoint), logs / "runtime.log"),
    ]
    enclave_proc, runtime_proc = procs

    def kill_enclave() -> None:
        enclave_proc.kill()  # SIGKILL: a crash, not a clean shutdown
        enclave_proc.wait()

    try:
        client = InferenceClient(endpoint, model_id)
        try:
            client.wait_ready(timeout=60)
        except TimeoutError:
            raise RuntimeError(f"demo services did not become ready; see {workdir / 'logs'}") from None
        finally:
            client.close()
        yield Target(workdir / "bundle", endpoint=endpoint, enclave=enclave_addr, seed=seed,
                     license=valid, owner_key=owner_key, revoked_license=revoked, kill_enclave=kill_enclave,
                     alive=lambda: {"enclave": enclave_proc.poll() is None, "runtime": runtime_proc.poll() is None})
    finally:
        stop_all(procs)
        shutil.rmtree(sock_dir, ignore_errors=True)
