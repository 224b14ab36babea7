"""Write the files of docs/byo.md's walk-through: the embedded MNIST split as an ImageFolder of PNG files
(DIR/train/<digit>/*.png, DIR/test/<digit>/*.png), the same split as an .npz, and examples/byo/small_cnn.py's
network exported to ONNX (random init: its public part is then pretrained on --public-data digits).

    python scripts/byo_example_data.py --out runs/byo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sealnet.data import mnist_embedded
from sealnet.protect.user_model import open_user_model

EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "byo" / "small_cnn.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/byo"))
    args = parser.parse_args()
    data = mnist_embedded(seed=0)
    folder = args.out / "mnist-png"
    for split, xs, ys in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            directory = folder / split / str(int(y))
            directory.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0] * 255).round().astype(np.uint8)).save(directory / f"{i:05d}.png")
    np.savez_compressed(args.out / "mnist.npz", x=(data.x_train * 255).round().astype(np.uint8), y=data.y_train,
                        x_test=(data.x_test * 255).round().astype(np.uint8), y_test=data.y_test)
    model = open_user_model(f"{EXAMPLE_MODEL}:small_cnn", input_shape=(1, 28, 28), num_classes=10).module.eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(args.out / "small_cnn.onnx"), dynamo=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})
    print(f"{folder}/ ({len(data.x_train)} train + {len(data.x_test)} test PNG files), {args.out / 'mnist.npz'}, "
          f"{args.out / 'small_cnn.onnx'}")


if __name__ == "__main__":
    main()
