"""Passport networks and their plain counterparts, registered in the model registry.

- cnn_p / cnn_plain: a small CNN for 28x28 MNIST (works down to 8x8 digits). The passport layers sit deep,
  on conv3 and conv4 (many input channels), never on the 1-channel first conv: a passport acts mostly
  through its per-channel means, and on a 1-channel layer every fake passport is the true one rescaled.
- alexnet_p / alexnet_plain: AlexNet_p of the extended paper (Table III), passports on conv3, conv4, conv5.
- resnet18_p / resnet18_plain: ResNet_p-18 (Table III), passports on every conv of Conv5_x (layer4), the 1x1
  downsample shortcut included, so that no path around the passport layers carries the signal (see ResNetP18).

Config (what checkpoints store): passport nets take `scheme` ("v1": BatchNorm, no public affine; "v2"/"v3":
GroupNorm everywhere and a public gamma/beta branch for distribution) and `passport_fn` ("gamma", "beta",
"both"); plain nets take `norm` ("bn" or "gn"). Every net exposes `stem` (everything before the first
passport layer) and `body`, with forward(x) = body(stem(x)), so evaluations can cache the stem's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sealnet.protect.models import register_model
from sealnet.protect.passport import PassportConv2d, init_passport_shapes, make_norm, scheme_norm


class ConvNorm(nn.Module):
    """The plain counterpart of PassportConv2d: conv (no bias) -> normalisation with learned affine."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm: str = "bn"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.norm = make_norm(norm, out_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _layer_factory(passport: bool, norm: str, passport_fn: str, public_affine: bool):
    """conv(in, out, k, stride, padding) -> a passport layer or its plain counterpart."""
    def make(i: int, o: int, k: int, s: int = 1, p: int = 0, use_passport: bool = True) -> nn.Module:
        if passport and use_passport:
            return PassportConv2d(i, o, k, s, p, norm=norm, passport_fn=passport_fn, public_affine=public_affine)
        return ConvNorm(i, o, k, s, p, norm=norm)

    return make


def _resolve(passport: bool, scheme: str, norm: str | None) -> tuple[str, bool]:
    if passport:
        return scheme_norm(scheme), scheme != "v1"
    return norm or "bn", False


class _StemBody(nn.Module):
    stem: nn.Module
    body: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


class CNNp(_StemBody):
    """conv3x3 w1 -> pool -> conv3x3 w2 -> pool -> [P conv w3] -> [P conv w4] -> pool -> [P conv w5] -> GAP -> fc.

    [P ...] are passport layers (conv3-5; on 28x28 input they see 7x7, 7x7 and 3x3 maps). The last one is
    wide: with a random passport each of its channels keeps or loses its trained sign at random, and the
    fraction that happens to agree concentrates around 1/2 as 1/sqrt(w5); that fraction is what decides a
    lucky fake's accuracy, so a wide last passport layer is what keeps the fake-passport maximum low.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, passport: bool = True,
                 scheme: str = "v1", passport_fn: str = "both", norm: str | None = None,
                 widths: tuple[int, ...] | list[int] = (16, 32, 64, 64, 256),
                 passport_layers: tuple[int, ...] | list[int] = (3, 4, 5)):
        super().__init__()
        norm_kind, public = _resolve(passport, scheme, norm)
        conv = _layer_factory(passport, norm_kind, passport_fn, public)
        channels, height, width = input_shape
        w1, w2, w3, w4, w5 = widths
        on = set(passport_layers)
        if passport and not on <= {3, 4, 5}:
            raise ValueError(f"cnn_p passport layers must be among conv3-5 (deep), got {sorted(on)}")
        self.stem = nn.Sequential(
            ConvNorm(channels, w1, 3, 1, 1, norm_kind), nn.ReLU(), nn.MaxPool2d(2),
            ConvNorm(w1, w2, 3, 1, 1, norm_kind), nn.ReLU(), nn.MaxPool2d(2),
        )
        pool = nn.MaxPool2d(2) if min(height, width) // 4 >= 4 else nn.Identity()
        self.body = nn.Sequential(
            conv(w2, w3, 3, 1, 1, 3 in on), nn.ReLU(),
            conv(w3, w4, 3, 1, 1, 4 in on), nn.ReLU(), pool,
            conv(w4, w5, 3, 1, 1, 5 in on), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w5, num_classes),
        )
        if passport:
            init_passport_shapes(self, input_shape)


class AlexNetP(_StemBody):
    """AlexNet_p (extended paper, Table III): 5 convs, passports on conv3-5, 32x32 input -> 4x4x256 -> fc."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, passport: bool = True,
                 scheme: str = "v1", passport_fn: str = "both", norm: str | None = None,
                 passport_layers: tuple[int, ...] | list[int] = (3, 4, 5)):
        super().__init__()
        norm_kind, public = _resolve(passport, scheme, norm)
        conv = _layer_factory(passport, norm_kind, passport_fn, public)
        channels, height, width = input_shape
        on = set(passport_layers)
        self.stem = nn.Sequential(
            conv(channels, 64, 5, 1, 2, 1 in on), nn.ReLU(), nn.MaxPool2d(2),
            conv(64, 192, 5, 1, 2, 2 in on), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.body = nn.Sequential(
            conv(192, 384, 3, 1, 1, 3 in on), nn.ReLU(),
            conv(384, 256, 3, 1, 1, 4 in on), nn.ReLU(),
            conv(256, 256, 3, 1, 1, 5 in on), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256 * (height // 8) * (width // 8), num_classes),
        )
        if passport:
            init_passport_shapes(self, input_shape)


class BasicBlock(nn.Module):
    """relu(convbn_2(relu(convbnrelu_1(x))) + shortcut(x)); `passport_here` puts passports on every conv of the
    block, the 1x1 downsample shortcut included."""

    def __init__(self, conv, in_planes: int, planes: int, stride: int, passport_here: bool):
        super().__init__()
        self.convbnrelu_1 = conv(in_planes, planes, 3, stride, 1, passport_here)
        self.convbn_2 = conv(planes, planes, 3, 1, 1, passport_here)
        self.shortcut = (conv(in_planes, planes, 1, stride, 0, passport_here) if stride != 1 or in_planes != planes
                         else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.convbnrelu_1(x))
        return self.relu(self.convbn_2(out) + self.shortcut(x))


class ResNetP18(_StemBody):
    """ResNet_p-18 (Table III): CIFAR ResNet-18, passports on every conv of Conv5_x (layer4, `body.0`).

    That is both 3x3 convs of both blocks and the first block's 1x1 stride-2 downsample shortcut (the second
    block's shortcut is the identity). The shortcut must be a passport layer too: with gamma = beta = 0 (what
    public.onnx ships) block 1 then outputs relu(0 + 0) = 0 and block 2 relu(0 + 0) = 0, so the logits are the
    fc bias for every input. With a plain shortcut the residual path carried layer3's features past the zeroed
    passport layers and the shipped network kept a third of its accuracy. Capacity: 5 layers x 8*width bits.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, passport: bool = True,
                 scheme: str = "v1", passport_fn: str = "both", norm: str | None = None, width: int = 64):
        super().__init__()
        norm_kind, public = _resolve(passport, scheme, norm)
        conv = _layer_factory(passport, norm_kind, passport_fn, public)
        channels = input_shape[0]
        w = width

        def group(in_planes: int, planes: int, stride: int, passport_here: bool) -> nn.Sequential:
            return nn.Sequential(BasicBlock(conv, in_planes, planes, stride, passport_here),
                                 BasicBlock(conv, planes, planes, 1, passport_here))

        self.stem = nn.Sequential(
            conv(channels, w, 3, 1, 1, False), nn.ReLU(),
            group(w, w, 1, False), group(w, 2 * w, 2, False), group(2 * w, 4 * w, 2, False),
        )
        self.body = nn.Sequential(
            group(4 * w, 8 * w, 2, True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
        )
        if passport:
            init_passport_shapes(self, input_shape)


# Plain counterpart of each passport net (same layers, learned affine norms instead of passports).
PLAIN_COUNTERPART = {"cnn_p": "cnn_plain", "alexnet_p": "alexnet_plain", "resnet18_p": "resnet18_plain"}


def plain_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The plain counterpart's config for a passport net's config: same sizes, the scheme's normalisation."""
    cfg = {k: v for k, v in model_config.items() if k not in ("scheme", "passport_fn", "passport_layers")}
    cfg["norm"] = scheme_norm(model_config.get("scheme", "v1"))
    return cfg


@register_model("cnn_p")
def cnn_p(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return CNNp(input_shape, num_classes, passport=True, **config)


@register_model("cnn_plain")
def cnn_plain(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return CNNp(input_shape, num_classes, passport=False, **config)


@register_model("alexnet_p")
def alexnet_p(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return AlexNetP(input_shape, num_classes, passport=True, **config)


@register_model("alexnet_plain")
def alexnet_plain(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return AlexNetP(input_shape, num_classes, passport=False, **config)


@register_model("resnet18_p")
def resnet18_p(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return ResNetP18(input_shape, num_classes, passport=True, **config)


@register_model("resnet18_plain")
def resnet18_plain(input_shape: tuple[int, int, int], num_classes: int, **config: Any) -> nn.Module:
    return ResNetP18(input_shape, num_classes, passport=False, **config)
