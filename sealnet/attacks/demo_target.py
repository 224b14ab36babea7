"""`sealnet attack --demo`: a target to try the suite on with one command.

Builds the demo's Generator-protected bundle on the embedded MNIST data (the same steps as `sealnet demo`),
starts its own trusted module (Unix socket, with a revocation list) and runtime (loopback) as child processes,
and hands the suite a Target that may kill the module it started. Nothing outside this is ever killed.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from sealnet.attacks.base import Target
from sealnet.data import mnist_embedded
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim.service import EnclaveOptions
from sealnet.protect.methods import get_method, with_demo

REVOKED_SERIAL = "SN-REVOKED"


@contextlib.contextmanager
def demo_target(workdir: Path, *, epochs: int = 8, seed: int = 0, method: str = "transform",
                log=print) -> Iterator[Target]:
    """Train + export the demo bundle into `workdir` (replaced), serve it, yield the target, stop the services.
    `method`: any method with a demo plan (the Generator-protected CNN, a public backbone + sealed head)."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    data = mnist_embedded(seed=0)
    plan = get_method(method).demo()
    if plan is None:
        raise ValueError(f"method {method!r} has no demo target (methods with one: {', '.join(with_demo())})")
    log(f"== demo target ({epochs} epochs): {plan.story}")
    plan.train(data, workdir, epochs, seed)
    model_id = plan.model_id
    (workdir / "revoked.txt").write_text(f"# revoked for the attack suite\n{REVOKED_SERIAL}\n")
    options = EnclaveOptions(revocations=workdir / "revoked.txt", audit_log=workdir / "logs" / "audit.jsonl")
    with LocalDeployment.export(workdir / "protected.pt", workdir, model_id=model_id, log=log, processes=True,
                                enclave_options=options) as d:
        log(f"== demo target: trusted module on {d.enclave}, runtime on {d.endpoint} (logs in {d.logs})")
        valid = d.license("tester", "SN-TESTER", valid_seconds=4 * 3600)
        revoked = d.license("former", REVOKED_SERIAL, valid_seconds=4 * 3600)
        yield Target(d.bundle, endpoint=d.endpoint, enclave=d.enclave, seed=seed, license=valid,
                     owner_key=d.owner_key, revoked_license=revoked, kill_enclave=d.kill_enclave, alive=d.alive)
