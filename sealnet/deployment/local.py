"""A throw-away local deployment of a protected checkpoint, for evaluations that must go through the real
data path: fresh owner key and embedded keystore, export, trusted module on a Unix socket and the KServe v2
runtime on loopback (both in this process), queried over gRPC with licenses it issues itself.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sealnet.bundle import PUBLIC_ONNX
from sealnet.enclave_sim.keystore import init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license, load_owner_key, write_owner_key
from sealnet.runtime.client import InferenceClient
from sealnet.runtime.onnx_session import ort_accuracy, ort_session


@dataclass
class LocalDeployment:
    bundle: Path
    manifest: dict[str, Any]
    client: InferenceClient
    endpoint: str  # HOST:PORT of the KServe v2 endpoint
    enclave: str  # unix:PATH of the trusted module
    _owner_key: Any

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    def license(self, customer_id: str = "eval", serial_number: str = "SN-EVAL", model_id: str | None = None) -> str:
        return issue_license(self._owner_key, customer_id=customer_id, model_id=model_id or self.model_id,
                             serial_number=serial_number, valid_seconds=3600)

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


@contextlib.contextmanager
def local_deployment(checkpoint: Path, *, model_id: str | None = None, data_dir: Path | None = None,
                     workdir: Path | None = None, log=lambda *_: None) -> Iterator[LocalDeployment]:
    from sealnet.enclave_sim import service as enclave_service
    from sealnet.runtime import server as runtime_server

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sn-deploy-", dir="/tmp")))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, _ = write_owner_key(workdir / "owner.key")
        keystore = KeystoreSpec("embedded", workdir / "keystore")
        init_keystore(keystore.directory)
        manifest = build_bundle(checkpoint, workdir / "bundle", owner_key=key_path, keystore=keystore,
                                model_id=model_id, data_dir=data_dir, force=True, log=log)
        enclave_addr = f"unix:{workdir / 'enclave.sock'}"
        enclave, _ = enclave_service.serve(workdir / "bundle", enclave_addr, keystore)
        stack.callback(enclave.stop, 0)
        server, service = runtime_server.serve(workdir / "bundle", "127.0.0.1:0", enclave_addr)
        stack.callback(server.stop, 0)
        client = InferenceClient(f"127.0.0.1:{service.port}", manifest["model_id"])
        stack.callback(client.close)
        client.wait_ready(timeout=30)
        yield LocalDeployment(workdir / "bundle", manifest, client, f"127.0.0.1:{service.port}", enclave_addr,
                              load_owner_key(key_path))
