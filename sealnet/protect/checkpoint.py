"""Protected checkpoints: the public network, the secret part, and the metrics of the run that made them.

Written by protect/, read by export/. Loaded with torch.load(weights_only=True): tensors and plain types only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sealnet.protect.backbones  # noqa: F401  (registers the public backbones)
import sealnet.protect.passport_models  # noqa: F401  (registers the passport nets)
from sealnet.protect.models import create_model
from sealnet.protect.transform import create_transform

FORMAT = "sealnet-checkpoint/1"


@dataclass
class ProtectedCheckpoint:
    method: str
    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    public_state: dict[str, torch.Tensor]
    secret: dict[str, Any]  # method-specific: {"variant", "config", "state"} for the transform; for "passport"
    # {"scheme", "passport_fn", "passport_type", "passports": {layer: {"gamma", "beta"}}, "bits", ...}; for
    # "sealed-head" {"head_config", "head_state", "backbone_sha256", "output_policy"}
    dataset: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    # A model the user brought (sealnet/protect/user_model.py): the public part as the ONNX bytes that ship
    # (uint8); None for sealnet's registry networks, which `model_name` and `public_state` rebuild.
    public_onnx: torch.Tensor | None = None
    data_config: dict[str, Any] = field(default_factory=dict)  # the data's ImageOptions (resize, normalise)

    @property
    def user_model(self) -> bool:
        """True for a model the user brought: its halves are ONNX graphs, not registry networks."""
        return self.public_onnx is not None

    def build_public_model(self) -> nn.Module:
        if self.user_model:
            raise ValueError(f"checkpoint holds a user model ({self.model_config.get('source')}) as ONNX; "
                             "it has no registry network to rebuild")
        model = create_model(self.model_name, self.input_shape, self.num_classes, **self.model_config)
        model.load_state_dict(self.public_state)
        return model.eval()

    def build_passport_model(self) -> nn.Module:
        """The public network with the secret passports installed (gamma/beta derivable)."""
        self.require_method("passport")
        from sealnet.protect.passport import set_passports

        model = self.build_public_model()
        set_passports(model, self.secret["passports"])
        return model.eval()

    def build_head(self) -> nn.Module:
        """The private head of a sealed-head checkpoint (eval mode), forward(taps [N, F]) -> logits [N, C]."""
        self.require_method("sealed-head")
        from sealnet.protect.heads import head_from_config

        return head_from_config(self.secret["head_config"], self.secret["head_state"])

    def build_transform(self) -> nn.Module:
        """The secret input transform of a transform checkpoint."""
        self.require_method("transform")
        module = create_transform(self.secret["variant"], self.input_shape, **self.secret["config"])
        module.load_state_dict(self.secret["state"])
        return module.eval()


    def require_method(self, method: str) -> None:
        """For code that applies to one method's checkpoints: a clear error for any other."""
        if self.method != method:
            raise ValueError(f"checkpoint method is {self.method!r}, not {method!r}")


def bytes_tensor(data: bytes) -> torch.Tensor:
    """Bytes (an ONNX graph) as a uint8 tensor: what a checkpoint can hold and torch.load(weights_only=True)
    reads back."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes `bytes_tensor` stored."""
    return tensor.numpy().tobytes()


def save_checkpoint(ckpt: ProtectedCheckpoint, path: Path) -> Path:
    """Write atomically (temp file + rename) with mode 0600: the file holds the model's secret part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save({"format": FORMAT, **{k: v for k, v in vars(ckpt).items()}}, f)
    os.replace(tmp, path)
    return path


def load_tagged(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """torch.load(weights_only=True) a dict whose "format" is `fmt` (removed); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; `sealnet protect` writes one")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.pop("format", None) != fmt:
        raise ValueError(f"{path} is not a {fmt} file")
    return data


def load_checkpoint(path: Path) -> ProtectedCheckpoint:
    data = load_tagged(path, FORMAT, "checkpoint")
    data["input_shape"] = tuple(data["input_shape"])
    return ProtectedCheckpoint(**data)
