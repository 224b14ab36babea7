"""Small checks against a running Triton deployment with the standard library only (the demo uses them; the
tests use stock tritonclient): one licensed request over the v2 HTTP/REST endpoint, the metric family names."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import numpy as np

from sealnet.runtime.triton.protocol import LICENSE_KEY


def http_infer(url: str, model: str, x: np.ndarray, token: str | None,
               input_name: str = "input") -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a v2 REST inference request (JSON tensors) with the license header."""
    body = json.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape),
                                   "data": np.asarray(x, np.float32).reshape(-1).tolist()}]}).encode()
    headers = {"Content-Type": "application/json", **({LICENSE_KEY: token} if token else {})}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric_families(metrics_url: str) -> list[str]:
    """The metric family names a Prometheus scrape of `metrics_url` shows, sorted."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return sorted(set(re.findall(r"^# TYPE (\S+)", text, re.M)))


def ensemble_steps(url: str, model: str) -> list[str]:
    """The models an ensemble runs, in order (its v2 model configuration); [] for a model that is not one."""
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/config", timeout=10) as resp:
        config = json.loads(resp.read())
    if config.get("platform") != "ensemble":
        return []
    return [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]
