"""The protected data path, one module for every engine (the built-in server and Triton's Python backend).

A merged batch of requests, possibly from several licenses, is served with one trusted-module call per license
and end client (the module checks each client's lockout) and one run of the public network. The bundle's
module step (manifest `module_step`, sealnet/bundle.py) decides the order:
- module first: `preprocess` (raw -> trusted module -> public network -> logits: an input transform, a DSN
  stamp) or `params` (the module's parameters go into the public network, which runs on raw inputs: passports);
- module last: `classify` (raw -> public backbone -> features -> trusted module (license, head, output
  policy) -> answer: a sealed head).
Every answer passes through the trusted module; there is no branch that answers from the public network alone
(except the benchmark bypass, `enclave=None`, which answers with exactly what a pirate has).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import onnx

from sealnet.bundle import CLASSIFY, PARAMS, PUBLIC_ONNX, Bundle
from sealnet.onnx_session import ort_session, session_from_model, with_params
from sealnet.runtime.enclave_client import EnclaveClient
from sealnet.runtime.errors import EnclaveError, InternalError, ServingError

log = logging.getLogger("sealnet.runtime")


@dataclass(frozen=True)
class Request:
    token: str  # the license, as the client sent it
    client: str  # the end client's identity, for the module's lockout
    batch: np.ndarray  # [n, *item_shape] float32


Outputs = dict[str, np.ndarray]
Outcome = tuple[Outputs | None, ServingError | None]


class Pipeline:
    """Holds the public network's ONNX Runtime session and the trusted-module client of one bundle."""

    def __init__(self, bundle: Bundle, enclave: EnclaveClient | None, *, ort_threads: int = 0,
                 providers: list[str] | None = None, network: Network | None = None):
        """`network` runs the public network elsewhere (e.g. Triton's own ONNX Runtime / TensorRT model over
        BLS) instead of an in-process ONNX Runtime session; passport bundles cannot: their weights change with
        the trusted module's gamma/beta."""
        manifest = bundle.manifest
        self.bundle = bundle
        self.enclave = enclave
        self.method: str = manifest["method"]
        self.step: str = manifest["module_step"]
        self.module_last = self.step == CLASSIFY
        self.module_params = self.step == PARAMS
        self.input_name: str = manifest["input"]["name"]
        self.item_shape: tuple[int, ...] = tuple(manifest["input"]["shape"][1:])
        self.outputs: list[dict[str, Any]] = manifest["outputs"]
        self.max_batch = int(manifest.get("max_batch", 1024))
        self._ort_threads, self._providers = ort_threads, providers or ["auto"]
        if network is not None and self.module_params:
            raise ValueError(f"{self.method} bundles run the public network in-process (the trusted module's "
                             "parameters replace its weights per session); serve them without an external network")
        self._network = network
        self.session = None if network else ort_session(bundle.path(PUBLIC_ONNX), threads=ort_threads,
                                                        providers=self._providers)
        if self.module_params:
            self._public_model = onnx.load(str(bundle.path(PUBLIC_ONNX)))
            self._param_names = list(manifest["passport_params"])
            self._params_digest = b""  # the shipped (zero) gamma/beta: what the bypass serves
            self._session_lock = threading.Lock()

    def serve(self, requests: list[Request]) -> list[Outcome]:
        """Answer every request; a failure (refused license, module down, a crash in this code) fails only the
        requests it concerns and is returned, never raised."""
        if self.module_last:
            return serve_module_last(requests, self.run_network, self._after)
        return serve_module_first(requests, self._before, self.run_network, self.outputs[0]["name"])

    # -- the trusted module's part -----------------------------------------------------------------------------
    def _before(self, token: str, client: str, batch: np.ndarray) -> np.ndarray:
        if self.enclave is None:
            return batch
        if self.module_params:
            self._use_params(self.enclave.passport_params(token, len(batch), client=client))
            return batch
        return self.enclave.preprocess(token, batch, client=client)

    def _after(self, token: str, client: str, features: np.ndarray) -> Outputs:
        if self.enclave is None:  # benchmark bypass: nothing to answer with but the public features
            return {spec["name"]: np.zeros((len(features), *spec["shape"][1:]), _NUMPY[spec["datatype"]])
                    for spec in self.outputs}
        return self.enclave.classify(token, features, self.outputs, client=client)

    def _use_params(self, params: dict[str, np.ndarray]) -> None:
        """Make sure the session runs with these gamma/beta (the same on every call unless the module changed)."""
        if sorted(params) != sorted(self._param_names):
            raise EnclaveError(grpc.StatusCode.INTERNAL, "trusted module returned passport parameters that do not "
                               "match this bundle")
        digest = hashlib.sha256(b"".join(params[n].tobytes() for n in self._param_names)).digest()
        with self._session_lock:
            if digest == self._params_digest:
                return
            try:
                model = with_params(self._public_model, params)
            except ValueError as exc:
                raise EnclaveError(grpc.StatusCode.INTERNAL,
                                   f"passport parameters do not fit public.onnx: {exc}") from None
            self.session = session_from_model(model, threads=self._ort_threads, providers=self._providers)
            self._params_digest = digest

    def run_network(self, batch: np.ndarray) -> np.ndarray:
        """The public network (or backbone) on a merged batch: logits, or features for a sealed head."""
        if self._network is not None:
            return np.asarray(self._network(batch), dtype="<f4")
        return self.session.run(None, {self.input_name: batch})[0].astype("<f4", copy=False)


_NUMPY = {"FP32": np.float32, "INT64": np.int64}
Module = Callable[[str, str, np.ndarray], Any]  # (license token, client, batch) -> the module's answer
Network = Callable[[np.ndarray], np.ndarray]


def _guarded(serve):
    """Run a serving order so that no exception escapes: what is still open when one does fails INTERNAL."""
    def run(requests: list[Request], *args) -> list[Outcome]:
        outcomes: list[Outcome] = [(None, None)] * len(requests)
        try:
            serve(requests, outcomes, *args)
        except Exception as exc:  # a bug or a library failure: fail what is still open, keep the worker alive
            log.exception("pipeline failure on a batch of %d requests", len(requests))
            error = InternalError(f"inference failed: {type(exc).__name__}")
            outcomes[:] = [(res, err) if (res is not None or err is not None) else (None, error)
                           for res, err in outcomes]
        return outcomes

    return run


@_guarded
def serve_module_first(requests: list[Request], outcomes: list[Outcome], before: Module, network: Network,
                       output_name: str) -> None:
    """Transform / stamp / passport order: one `before` call per license, then one network run for all."""
    served: list[tuple[int, np.ndarray]] = []
    for members in _by_license(requests).values():
        first = requests[members[0]]
        try:
            processed = before(first.token, first.client, _concat([requests[i].batch for i in members]))
        except Exception as exc:
            _fail(outcomes, members, exc)
            continue
        served.extend(zip(members, _split(processed, [len(requests[i].batch) for i in members]), strict=True))
    if not served:
        return
    try:
        logits = network(_concat([x for _, x in served]))
    except Exception as exc:
        _fail(outcomes, [i for i, _ in served], exc)
        return
    for (i, _), part in zip(served, _split(logits, [len(x) for _, x in served]), strict=True):
        outcomes[i] = ({output_name: part}, None)


@_guarded
def serve_module_last(requests: list[Request], outcomes: list[Outcome], network: Network, after: Module) -> None:
    """Sealed-head order: one network run for all, then one `after` call per license on its features."""
    try:
        features = network(_concat([r.batch for r in requests]))
    except Exception as exc:
        _fail(outcomes, range(len(requests)), exc)
        return
    per_request = _split(features, [len(r.batch) for r in requests])
    for members in _by_license(requests).values():
        first = requests[members[0]]
        try:
            answer = after(first.token, first.client, _concat([per_request[i] for i in members]))
        except Exception as exc:
            _fail(outcomes, members, exc)
            continue
        sizes = [len(requests[i].batch) for i in members]
        parts = {name: _split(value, sizes) for name, value in answer.items()}
        for j, i in enumerate(members):
            outcomes[i] = ({name: split[j] for name, split in parts.items()}, None)


def _by_license(requests: list[Request]) -> dict[tuple[str, str], list[int]]:
    """Requests grouped by (license, client): the module judges each client's lockout on its own call, so a
    locked-out client never rides on another's call with the same license."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.token, request.client), []).append(i)
    return groups


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _split(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [array]


def _fail(outcomes: list[Outcome], members, exc: Exception) -> None:
    if not isinstance(exc, ServingError):
        log.error("inference failed: %s: %s", type(exc).__name__, exc)
        exc = InternalError(f"inference failed: {type(exc).__name__}")
    for i in members:
        outcomes[i] = (None, exc)
