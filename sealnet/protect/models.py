"""Model registry (one place to look a network up by name, as timm does) and the networks themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder `fn(input_shape, num_classes, **config) -> nn.Module` under `name`."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    """Build a registered model; the (name, input_shape, num_classes, config) tuple is what checkpoints store."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(available_models())}") from None
    return builder(tuple(input_shape), num_classes, **config)


class SimpleCNN(nn.Module):
    """Table 1 of Chen & Wu: conv3x3 32 -> pool -> conv3x3 64 -> pool -> fc1024 (dropout 0.5) -> fc."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32, hidden: int = 1024):
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (height // 4) * (width_px // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("simple_cnn")
def simple_cnn(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return SimpleCNN(input_shape, num_classes, **config)
