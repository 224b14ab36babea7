"""Regenerate sealnet/_grpc from proto/*.proto (run after editing a .proto; a test checks they agree)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("inference.proto", "enclave.proto")


def generate(out_dir: Path) -> None:
    """Write the *_pb2.py / *_pb2_grpc.py modules for every proto into out_dir, with package-relative imports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PROTOS:
        rc = protoc.main(
            ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", name]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on proto/{name}")
    for path in out_dir.glob("*_pb2_grpc.py"):
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", path.read_text(), flags=re.M)
        path.write_text(text)
    # Our messages live in a private descriptor pool: the KServe package name `inference` is also registered
    # by tritonclient and kserve, and two files defining the same symbols cannot share the default pool.
    for path in out_dir.glob("*_pb2.py"):
        text = path.read_text().replace("_descriptor_pool.Default()", "_PRIVATE_POOL")
        text = text.replace("_sym_db = ", "_PRIVATE_POOL = _descriptor_pool.DescriptorPool()\n_sym_db = ", 1)
        path.write_text(text)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "sealnet" / "_grpc"
    generate(target)
    print(f"generated into {target}")
