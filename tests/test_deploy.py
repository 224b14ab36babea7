"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas offline (the kubernetes-validate
package ships them), the KServe InferenceService's pod part does too, and every container command, the
Dockerfile's included, parses with sealnet's own CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sealnet.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.30.0"  # the oldest release with every field used here that clusters still commonly run
SOCKET = "/run/sealnet/enclave.sock"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _pod_spec(doc: dict) -> dict:
    if doc["kind"] == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return {k: predictor[k] for k in ("containers", "volumes", "securityContext")}
    return doc["spec"]["template"]["spec"]


def _enclave_parser() -> argparse.ArgumentParser:
    from sealnet.enclave_sim.__main__ import add_arguments

    parser = argparse.ArgumentParser(prog="sealnet enclave", exit_on_error=False)
    add_arguments(parser)
    return parser


def _check_pod(spec: dict) -> None:
    """Both containers parse as sealnet commands, share the socket's emptyDir, and Triton is probed for ready."""
    triton, module = spec["containers"]
    serve = build_parser().parse_args(triton["args"])
    assert serve.command == "serve" and serve.engine == "triton" and module["args"][0] == "enclave"
    enclave = _enclave_parser().parse_args(module["args"][1:])  # `sealnet enclave` execs python -m sealnet.enclave_sim
    assert serve.enclave == enclave.listen == f"unix:{SOCKET}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in (triton, module):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[str(Path(SOCKET).parent)]]
        assert mounts["/bundle"] == "bundle"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["port"] in ("http", serve.http_port)
    assert "containerPort" not in json.dumps(module)  # the trusted module is reachable only through the socket


@pytest.mark.parametrize("name", ["kubernetes/deployment.yaml", "kubernetes/service.yaml"])
def test_kubernetes_manifests_validate_offline(name):
    for doc in _docs(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] == "Deployment":
            _check_pod(_pod_spec(doc))


def test_kserve_inference_service_pod_validates():
    (doc,) = _docs("kserve/inferenceservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    spec = _pod_spec(doc)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
                                  "spec": spec}, K8S_VERSION, strict=True)
    assert spec["containers"][0]["name"] == "kserve-container"  # the container KServe routes to
    _check_pod(spec)


def test_a_broken_manifest_is_caught():
    (doc,) = [d for d in _docs("kubernetes/deployment.yaml") if d["kind"] == "Deployment"]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_dockerfile_builds_on_triton_with_the_backend_requirements_and_a_valid_command():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\S+-py3$", text, re.M)
    assert "requirements-backend.txt" in text
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""), re.M | re.S).group(1))
    assert entry == ["sealnet"]
    args = build_parser().parse_args(cmd)
    assert args.engine == "triton" and args.enclave == f"unix:{SOCKET}"
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
