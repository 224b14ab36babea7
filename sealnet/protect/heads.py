"""The sealed head's network and a MAC counter: torch only, so checkpoints can rebuild a head cheaply."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SealedHead(nn.Module):
    """Standardise the taps (mean/std of the training taps, stored as buffers), then an MLP to logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (512,), dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std)


def head_from_config(head_config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> SealedHead:
    """Rebuild the head from the plain-typed config stored in a checkpoint (eval mode)."""
    head = SealedHead(int(head_config["in_features"]), int(head_config["num_classes"]),
                      tuple(int(h) for h in head_config["hidden"]), float(head_config.get("dropout", 0.0)))
    if state is not None:
        head.load_state_dict(state)
    return head.eval()


def flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for ONE input of `input_shape` (no batch dim),
    from each layer's output size: conv = out elements x in_channels/groups x kernel area; linear = in x out."""
    total = 0

    def hook(layer: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += output.numel() * (layer.in_channels // layer.groups) * kh * kw
        elif isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return int(total)
