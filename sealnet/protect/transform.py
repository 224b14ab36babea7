"""The anti-piracy input transform of Chen & Wu: x_p = x_r + perturbation.

Parameters are sealed as plain numpy arrays plus a JSON-able config, never as pickles; the trusted module runs
them as an ONNX graph (enclave_sim/transform_graph.py), which tests check against these modules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from sealnet.protect import VARIANTS


class FixedPerturbation(nn.Module):
    """A universal bipolar pattern drawn once: each pixel is +sigma, 0 or -sigma with prob. p, 1-2p, p."""

    variant = "fixed"

    def __init__(self, input_shape: tuple[int, ...], sigma: float = 0.1, p: float = 0.2, seed: int = 0):
        super().__init__()
        if not 0 < p <= 0.5:
            raise ValueError(f"p must be in (0, 0.5], got {p}")
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(tuple(input_shape), generator=gen)
        delta = torch.zeros(tuple(input_shape))
        delta[u < p] = sigma
        delta[u > 1 - p] = -sigma
        self.register_buffer("delta", delta)
        self.config = {"sigma": sigma, "p": p}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


class LearnedPerturbation(nn.Module):
    """A universal perturbation trained jointly with the network."""

    variant = "learned"

    def __init__(self, input_shape: tuple[int, ...], init_scale: float = 0.01, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.delta = nn.Parameter(init_scale * torch.randn(tuple(input_shape), generator=gen))
        self.config = {"init_scale": init_scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


class GeneratorPerturbation(nn.Module):
    """An input-dependent perturbation: conv5x5 (hidden ch) -> ReLU -> conv1x1 -> tanh, scaled by `scale`."""

    variant = "generator"

    def __init__(self, input_shape: tuple[int, ...], hidden: int = 16, scale: float = 0.1):
        super().__init__()
        channels = input_shape[0]
        self.conv = nn.Conv2d(channels, hidden, 5, padding=2)
        self.bottleneck = nn.Conv2d(hidden, channels, 1)
        self.scale = scale
        self.config = {"hidden": hidden, "scale": scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.tanh(self.bottleneck(torch.relu(self.conv(x))))


def create_transform(variant: str, input_shape: tuple[int, ...], seed: int = 0, **config: Any) -> nn.Module:
    if variant == "fixed":
        return FixedPerturbation(input_shape, seed=seed, **config)
    if variant == "learned":
        return LearnedPerturbation(input_shape, seed=seed, **config)
    if variant == "generator":
        return GeneratorPerturbation(input_shape, **config)
    raise ValueError(f"unknown transform variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def transform_to_arrays(
    transform: nn.Module, input_shape: tuple[int, ...]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a transform into (config, arrays) for sealing; enclave_sim/transform_graph.py runs them."""
    config = {"variant": transform.variant, "input_shape": list(input_shape), **transform.config}
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in transform.state_dict().items()}
    return config, arrays
