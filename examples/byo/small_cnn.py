"""An integrator's own network, written without sealnet: three conv blocks and a two-layer classifier.

    sealnet inspect --model examples/byo/small_cnn.py:small_cnn --input-shape 1 28 28
"""

from torch import nn


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(in_channels, 16), *block(16, 32), *block(32, 64),
                         nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, num_classes))
