"""What an endpoint answers: the output tensors of a bundle, and the output policy of sealed-head bundles.

The policy bounds what a licensed caller (and an insider between the runtime and the trusted module) learns per
query: `label` (the class index only; default), `topk:K` (K classes with probabilities rounded to two
decimals), `logits` (the head's raw output; the most a copier can learn from). The trusted module applies it;
the runtime and the manifest only describe the tensors it yields. Numpy only: the trusted module imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_POLICY = "label"
PROBABILITY_DECIMALS = 2


@dataclass(frozen=True)
class OutputPolicy:
    kind: str  # "label", "topk" or "logits"
    k: int = 1

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind


def parse_policy(text: str, num_classes: int) -> OutputPolicy:
    """`label`, `topk:K` (1 <= K <= num_classes) or `logits`; ValueError naming the allowed forms otherwise."""
    if text in ("label", "logits"):
        return OutputPolicy(text)
    if text.startswith("topk:"):
        try:
            k = int(text.removeprefix("topk:"))
        except ValueError:
            k = 0
        if 1 <= k <= num_classes:
            return OutputPolicy("topk", k)
        raise ValueError(f"output policy {text!r}: K must be an integer in 1..{num_classes}")
    raise ValueError(f"output policy {text!r}: expected 'label', 'topk:K' or 'logits'")


def logits_outputs(num_classes: int) -> list[dict[str, Any]]:
    """The manifest `outputs` of a bundle whose endpoint returns the network's logits."""
    return [{"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]}]


def policy_outputs(policy: OutputPolicy, num_classes: int) -> list[dict[str, Any]]:
    """The manifest `outputs` of a sealed-head bundle under `policy`."""
    if policy.kind == "label":
        return [{"name": "label", "datatype": "INT64", "shape": [-1, 1]}]
    if policy.kind == "topk":
        return [{"name": "classes", "datatype": "INT64", "shape": [-1, policy.k]},
                {"name": "probs", "datatype": "FP32", "shape": [-1, policy.k]}]
    return logits_outputs(num_classes)


def apply_policy(logits: np.ndarray, policy: OutputPolicy) -> dict[str, np.ndarray]:
    """The tensors the policy lets out of the trusted module for a batch of head logits [N, C]."""
    if policy.kind == "label":
        return {"label": logits.argmax(1).astype("<i8")[:, None]}
    if policy.kind == "topk":
        shifted = logits - logits.max(1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(1, keepdims=True)
        classes = np.argsort(-logits, axis=1, kind="stable")[:, : policy.k]
        top = np.take_along_axis(probs, classes, axis=1).round(PROBABILITY_DECIMALS)
        return {"classes": classes.astype("<i8"), "probs": top.astype("<f4")}
    return {"logits": logits.astype("<f4", copy=False)}


def predicted_labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class predictions [N] from any endpoint answer (label, top-k or logits)."""
    if "label" in outputs:
        return outputs["label"].reshape(-1)
    if "classes" in outputs:
        return outputs["classes"][:, 0]
    return outputs["logits"].argmax(1)
