"""The one interface every attack shares: a target, a budget, and measured results judged against thresholds.

An attack states the attacker's knowledge it assumes (A1 pirate, A2 insider, A3 licensee of docs/security.md) and
returns metrics; each metric carries its threshold and PASS/FAIL, or is an observation (no target, passed
None). Nothing here ever holds a license token in a field that gets printed or written: tokens are bearer
credentials, so they live in `repr=False` fields and never reach a result.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sealnet.bundle import PARAMS, PUBLIC_ONNX, Bundle, load_bundle
from sealnet.data import Dataset, load_dataset

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


class Skip(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """The attack cannot run against this target (e.g. no trusted-module endpoint); the message says why."""


@dataclass(frozen=True)
class Metric:
    """One measured number; with `op` and `limit` it is judged, without them it is an observation."""

    name: str
    value: float
    op: str | None = None  # "<=", ">=" or "=="
    limit: float | None = None
    unit: str = "acc"  # "acc" (a fraction shown as %), "count", "s", "rate"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.op is None or self.limit is None:
            return None
        return bool(_OPS[self.op](self.value, self.limit))

    @property
    def threshold(self) -> str | None:
        if self.op is None or self.limit is None:
            return None
        return f"{self.op} {self.limit:.4g}"


@dataclass
class Outcome:
    """What an attack's run function returns; the runner adds name, knowledge and timing."""

    metrics: list[Metric]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names written into the output directory


@dataclass(frozen=True)
class Budget:
    """How hard to try. "small" fits the whole suite in minutes on 2 cores; "full" is paper-sized."""

    name: str
    input_only_trials: int
    one_pair_trials: int
    pair_fractions: tuple[float, ...]
    pair_trials: int
    pair_steps: int
    steal_fractions: tuple[float, ...]
    steal_steps: int
    fuzz_requests: int
    fuzz_seconds: float
    session_guesses: int
    dead_requests: int
    forge_steps: int = 300  # training steps of a passport forgery (passport-cerb-forgery)


BUDGETS: dict[str, Budget] = {
    "small": Budget("small", input_only_trials=20, one_pair_trials=5, pair_fractions=(0.1, 0.5, 1.0), pair_trials=2,
                    pair_steps=800, steal_fractions=(0.01, 0.1), steal_steps=150, fuzz_requests=10_000,
                    fuzz_seconds=240.0, session_guesses=1_000, dead_requests=20),
    "full": Budget("full", input_only_trials=100, one_pair_trials=20, pair_fractions=(0.1, 0.5, 1.0), pair_trials=10,
                   pair_steps=3000, steal_fractions=(0.01, 0.1, 0.5), steal_steps=600, fuzz_requests=50_000,
                   fuzz_seconds=1200.0, session_guesses=10_000, dead_requests=100, forge_steps=1000),
}


@dataclass
class Target:
    """What the tester points the suite at: bundle files, and optionally the two live services.

    `license` is a valid license for the bundle's model (an A2/A3 attacker holds one); `owner_key` is only
    available when the owner lends it to the test (it lets the suite mint expired / other-model licenses);
    `kill_enclave` is set only when the tester allowed the suite to kill the trusted module.
    """

    bundle_dir: Path
    endpoint: str | None = None
    enclave: str | None = None
    enclave_tls: Path | None = None
    data_dir: Path | None = None
    seed: int = 0
    license: str | None = field(default=None, repr=False)
    owner_key: Any = field(default=None, repr=False)  # Ed25519PrivateKey
    revoked_license: str | None = field(default=None, repr=False)
    kill_enclave: Callable[[], None] | None = field(default=None, repr=False)
    alive: Callable[[], dict[str, bool]] | None = field(default=None, repr=False)  # service name -> process alive
    _pairs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)  # insider-obtained data

    @cached_property
    def bundle(self) -> Bundle:
        return load_bundle(self.bundle_dir)

    @property
    def method(self) -> str:
        return str(self.bundle.manifest.get("method", "?"))

    @property
    def step(self) -> str:
        """What the trusted module does for this bundle (sealnet/bundle.py's MODULE_STEPS)."""
        return str(self.bundle.manifest.get("module_step", "?"))

    @property
    def variant(self) -> str:
        return str(self.bundle.manifest.get("variant", ""))

    @cached_property
    def data(self) -> Dataset:
        """The bundle's evaluation data (named in its manifest), split as export split it."""
        manifest = self.bundle.manifest
        name = manifest.get("checks", {}).get("dataset", "mnist-embedded")
        return load_dataset(name, self.data_dir, seed=0, options=manifest["input"].get("preprocessing"))

    @cached_property
    def public_session(self):
        from sealnet.onnx_session import ort_session

        return ort_session(self.bundle.path(PUBLIC_ONNX), threads=1)  # small batches; cores may be shared

    @cached_property
    def public_model(self):
        """public.onnx as an onnx.ModelProto, parsed once (passport attacks fill in gamma/beta many times)."""
        import onnx

        return onnx.load(str(self.bundle.path(PUBLIC_ONNX)))

    def public_accuracy(self, x: np.ndarray, y: np.ndarray | None = None) -> float:
        """Accuracy of the copied public network (ONNX Runtime, CPU) on `x` against the test labels."""
        from sealnet.onnx_session import ort_accuracy

        return ort_accuracy(self.public_session, np.ascontiguousarray(x, dtype=np.float32),
                            self.data.y_test if y is None else y)

    def processed(self, split: str) -> np.ndarray:
        """The trusted module's output for the raw `split` ("train" or "test") images, obtained the way an
        insider (A2) gets it: calling the module with a valid license, exactly as the runtime does."""
        if split not in self._pairs:
            if not (self.enclave and self.license):
                raise Skip("needs the trusted module's address (--enclave) and a valid license (--license-file) "
                           "to obtain (raw, processed) pairs as an insider")
            from sealnet.runtime.enclave_client import EnclaveClient

            x = self.data.x_train if split == "train" else self.data.x_test
            step = min(500, int(self.bundle.manifest.get("max_batch", 500)))
            client = EnclaveClient(self.enclave, tls_dir=self.enclave_tls, timeout=60.0)
            try:
                parts = [client.preprocess(self.license, x[i : i + step], client=f"attack-insider-{self.seed}")
                         for i in range(0, len(x), step)]
            finally:
                client.close()
            self._pairs[split] = np.concatenate(parts)
        return self._pairs[split]

    def passport_params(self) -> dict[str, np.ndarray]:
        """Passport bundles: the gamma/beta the trusted module hands a licensed caller (as an insider gets them)."""
        if PARAMS not in self._pairs:
            if not (self.enclave and self.license):
                raise Skip("needs the trusted module's address (--enclave) and a valid license (--license-file) "
                           "to obtain the passport parameters as an insider")
            from sealnet.runtime.enclave_client import EnclaveClient

            client = EnclaveClient(self.enclave, tls_dir=self.enclave_tls, timeout=60.0)
            try:
                self._pairs[PARAMS] = client.passport_params(self.license, 1, client=f"attack-insider-{self.seed}")
            finally:
                client.close()
        return dict(self._pairs[PARAMS])

    def accuracy_with_params(self, params: dict[str, np.ndarray], x: np.ndarray | None = None,
                             y: np.ndarray | None = None) -> float:
        """Passport bundles: public.onnx run with these gamma/beta filled in, on raw test images by default."""
        from sealnet.onnx_session import ort_accuracy, session_from_model, with_params

        session = session_from_model(with_params(self.public_model, params), threads=1)
        return ort_accuracy(session, self.data.x_test if x is None else x, self.data.y_test if y is None else y)

    def authorized_accuracy(self) -> tuple[float, str]:
        """What a licensed user gets, and where the number comes from (measured, else the manifest's record)."""
        try:
            if self.step == PARAMS:
                return (self.accuracy_with_params(self.passport_params()),
                        "measured: public.onnx with the trusted module's gamma/beta")
            return self.public_accuracy(self.processed("test")), "measured: public.onnx on trusted-module outputs"
        except Skip:
            recorded = self.bundle.manifest.get("checks", {}).get("authorized_acc")
            if recorded is None:
                raise Skip("no trusted module to measure the authorized accuracy and none recorded in the "
                           "manifest") from None
            return float(recorded), "recorded in manifest.json at export (no trusted module given)"

    def describe(self) -> dict[str, Any]:
        """The target as the report shows it: addresses and ids, never a credential."""
        manifest = self.bundle.manifest
        return {"bundle": str(self.bundle_dir), "model_id": manifest.get("model_id"), "method": self.method,
                "variant": self.variant, "endpoint": self.endpoint, "enclave": self.enclave,
                "license": "given" if self.license else "none", "owner_key": "given" if self.owner_key else "none",
                "disruptive_attacks": bool(self.kill_enclave)}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the attacker's small trainings on `n` threads, then restore. OpenMP threads spin-wait, so on shared
    cores more threads are far slower (measured on 2 busy cores: an imitation fit 20 s on 2 threads, 0.4 s on 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A progress bar on stderr: live on a terminal, one closing line per loop in a log file."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else float("inf"))


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"
