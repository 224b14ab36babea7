"""Public backbones for the sealed-head method: frozen networks never trained on the owner's data.

Each backbone's forward returns ONE float32 tensor [N, F]: the pooled outputs of several stages ("taps"),
flattened and concatenated. The sealed head (protect/sealed_head.py) runs on those taps inside the trusted
module; the backbone itself is published as is, so its weights must be exactly the ones given (digest below).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sealnet.protect.models import create_model, register_model
from sealnet.protect.train import TrainConfig, _epochs

# Training counters, not weights: they never reach an inference graph, so the digest leaves them out.
_NOT_WEIGHTS = ("num_batches_tracked",)


def backbone_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over the sorted names, dtype, shape and little-endian bytes of every weight.

    The export gate recomputes it from public.onnx to prove the public file holds exactly the published
    weights (nothing trained on private data). BatchNorm's `num_batches_tracked` counters are skipped."""
    h = hashlib.sha256()
    for name in sorted(state):
        if name.rsplit(".", 1)[-1] in _NOT_WEIGHTS:
            continue
        t = state[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bit pattern
            arr = t.view(torch.int16).numpy()
        else:
            arr = t.numpy()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        h.update(len(header).to_bytes(8, "little") + header.encode())
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a [N, C, H, W] map to about grid x grid cells (kernel = stride = H // grid), flattened."""
    k = max(1, x.shape[-1] // grid)
    return F.avg_pool2d(x, k).flatten(1) if k > 1 else x.flatten(1)


class TapCNN(nn.Module):
    """conv3x3 -> BN -> ReLU -> maxpool2 per stage; taps: each stage's output average-pooled to `tap_grid[i]`.

    For 1x28x28 inputs with the default widths (32, 64, 128): stage outputs 14x14, 7x7, 3x3."""

    def __init__(self, input_shape: tuple[int, int, int], widths: Sequence[int] = (32, 64, 128),
                 tap_grid: Sequence[int] = (2, 3, 3)):
        super().__init__()
        if len(tap_grid) != len(widths):
            raise ValueError(f"tap_grid has {len(tap_grid)} entries for {len(widths)} stages")
        channels = input_shape[0]
        stages = []
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                        nn.ReLU(), nn.MaxPool2d(2)))
            channels = w
        self.stages = nn.ModuleList(stages)
        self.tap_grid = tuple(int(g) for g in tap_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = []
        for stage, grid in zip(self.stages, self.tap_grid, strict=True):
            x = stage(x)
            if grid > 0:
                taps.append(_pool(x, grid))
        return torch.cat(taps, 1)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, same parameter names (conv1, bn1, conv2, bn2, downsample.0/1)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet18Backbone(nn.Module):
    """torchvision's resnet18 without `fc` (state_dict keys match; a torchvision weights file loads strictly
    once `fc.*` is dropped); taps: global average pools of layer2, layer3 and layer4 (128 + 256 + 512 = 896).

    `normalize`: subtract/divide by the ImageNet mean/std inside the graph (constants, not weights), since
    pretrained torchvision weights expect normalised inputs and sealnet feeds [0, 1] images."""

    def __init__(self, input_shape: tuple[int, int, int], normalize: bool = True,
                 taps: Sequence[str] = ("layer2", "layer3", "layer4")):
        super().__init__()
        if input_shape[0] != 3:
            raise ValueError(f"resnet18 takes 3-channel images, got input shape {tuple(input_shape)}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes, layers = 64, []
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(planes, width, stride), BasicBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        unknown = set(taps) - {"layer1", "layer2", "layer3", "layer4"}
        if unknown or not taps:
            raise ValueError(f"resnet18 taps must be among layer1..layer4, got {list(taps)}")
        self.taps = tuple(taps)
        self.normalize = bool(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name in self.taps:
                out.append(x.mean((2, 3)))
        return torch.cat(out, 1)


@register_model("tap_cnn")
def tap_cnn(input_shape: tuple[int, int, int], num_classes: int = 0, **config: Any) -> nn.Module:
    """Public backbone for small grey images (num_classes unused: a backbone has no classifier)."""
    return TapCNN(input_shape, **config)


@register_model("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int = 0, **config: Any) -> nn.Module:
    """Public backbone for 3x32x32 images with torchvision resnet18 weights (num_classes unused)."""
    return ResNet18Backbone(input_shape, **config)


BACKBONES = ("tap_cnn", "resnet18")
DEFAULT_INPUT_SHAPE = {"tap_cnn": (1, 28, 28), "resnet18": (3, 32, 32)}
# Keys of a classifier that a published checkpoint may carry and the backbone does not use.
CLASSIFIER_KEYS = {"resnet18": ("fc.weight", "fc.bias")}


def load_backbone_weights(path: Path, arch: str, input_shape: tuple[int, int, int],
                          model_config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The backbone weights in a state_dict file, exactly as given, minus the classifier keys of `arch`
    (`fc.*` of a torchvision resnet18). Raises ValueError naming the keys when the file does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights {path} not found; `sealnet backbone make` writes one")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state_dict (name -> tensor)")
    state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS.get(arch, ())}
    expected = create_model(arch, input_shape, 0, **(model_config or {})).state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"{path} does not fit backbone {arch!r} on inputs {tuple(input_shape)}: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}")
    return state


def build_backbone(arch: str, input_shape: tuple[int, int, int], state: dict[str, torch.Tensor],
                   model_config: dict[str, Any] | None = None) -> nn.Module:
    """A frozen backbone in eval mode with `state` loaded strictly."""
    model = create_model(arch, input_shape, 0, **(model_config or {}))
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def extract_features(backbone: nn.Module, x: np.ndarray, batch_size: int = 250) -> torch.Tensor:
    """Taps of float32 NCHW images, computed once (the backbone is frozen)."""
    backbone.eval()
    return torch.cat([backbone(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


# -- public-by-construction weights ------------------------------------------------------------------------------
SOURCES = ("digits", "random")


def public_digits(input_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (public data, 1,797 images) placed like MNIST: the 8x8 image is
    upscaled (bilinear) to the central 20/28 of the frame and padded, in [0, 1]."""
    from sklearn.datasets import load_digits

    channels, height, width = input_shape
    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32))[:, None]
    inner = (round(height * 20 / 28), round(width * 20 / 28))
    x = F.interpolate(x, size=inner, mode="bilinear", align_corners=False).clamp(0, 1)
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    x = F.pad(x, (left, width - inner[1] - left, top, height - inner[0] - top))
    return x.repeat(1, channels, 1, 1).numpy(), bunch.target.astype(np.int64)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation +-15 deg, scale 0.85-1.15, shift +-10%): the 8x8 digits are few and
    stylised, so the backbone sees them in the positions and sizes real handwriting takes."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * (torch.pi / 6)
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def train_on_public_digits(backbone: nn.Module, input_shape: tuple[int, int, int], seed: int, epochs: int = 8,
                           batch_size: int = 64, lr: float = 2e-3, progress: bool = True) -> float:
    """Train `backbone` + a throw-away linear classifier on the augmented 8x8 digits; returns their
    training-set accuracy (without augmentation), a sanity check that the backbone learnt something."""
    x, y = (torch.from_numpy(a) for a in public_digits(input_shape))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        dim = backbone(x[:2]).shape[1]
    classifier = nn.Linear(dim, 10)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(classifier.parameters()), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _, bar in _epochs(TrainConfig(epochs=epochs, progress=progress), "public backbone (8x8 digits)",
                          -(-len(x) // batch_size)):
        backbone.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(classifier(backbone(_augment(x[idx], gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    backbone.eval()
    with torch.no_grad():
        return float((classifier(extract_features(backbone, x.numpy())).argmax(1) == y).float().mean())


def make_public_backbone(arch: str, seed: int, out: Path, kind: str = "digits",
                         input_shape: tuple[int, int, int] | None = None, epochs: int = 8,
                         model_config: dict[str, Any] | None = None) -> Path:
    """Write a backbone state_dict that is public by construction: `random` (fixed seeded initialisation)
    or `digits` (trained only on scikit-learn's 8x8 digits). Never sees the owner's data."""
    if kind not in SOURCES:
        raise ValueError(f"unknown backbone source {kind!r}; choose {', '.join(SOURCES)}")
    shape = tuple(input_shape or DEFAULT_INPUT_SHAPE.get(arch, (1, 28, 28)))
    torch.manual_seed(seed)
    model = create_model(arch, shape, 0, **(model_config or {}))
    if kind == "digits":
        train_on_public_digits(model, shape, seed, epochs=epochs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    return out
