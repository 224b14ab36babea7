"""torchvision's ResNet-18 (random init, or weights you pass with --weights), for 1- or 3-channel images.

Needs torchvision beside a matching torch (scripts/byo_resnet18.sh sets one up):
    sealnet inspect --model examples/byo/resnet18_torchvision.py:resnet18 --input-shape 1 32 32
"""

from torch import nn


def resnet18(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
