"""The Deep Serial Number: one student per customer, distilled to work only on inputs stamped with that
customer's owner-signed serial number; the trusted module stamps inputs for that customer's license alone.
The stamp identifies a copy; it does not lock it (docs/serial.md)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealnet.bundle import PREPROCESS
from sealnet.protect.methods.base import ExportOptions, ProtectionMethod, Split, register

if TYPE_CHECKING:
    from sealnet.data import Dataset
    from sealnet.protect.checkpoint import ProtectedCheckpoint


def _position(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL (e.g. 0,0), got {text!r}") from None
    return r, c


def _size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 3x3) or N, got {text!r}") from None


def add_record_arguments(parser: argparse.ArgumentParser, customer_help: str) -> None:
    """The owner-signed serial record's flags, shared by the serial-number methods (DSN, watermark)."""
    parser.add_argument("--owner-key", type=Path,
                        help="owner Ed25519 key (sealnet license keygen); signs the serial record")
    parser.add_argument("--company", help="serial record: company name")
    parser.add_argument("--model-id", help="serial record: model id")
    parser.add_argument("--customer", help=f"serial record: customer id ({customer_help})")
    parser.add_argument("--timestamp", type=int, help="serial record: Unix time (default: now)")
    parser.add_argument("--hidden", type=int, default=256, help="units of simple_cnn's hidden fc layer")
    parser.add_argument("--serial-out", type=Path, help="claim for the CA (default: OUT.serial.json)")


def serial_record(args: argparse.Namespace, default_customer: str | None) -> Any:
    """The SerialRecord the flags describe; exits naming the missing flags."""
    from sealnet.serial import SerialRecord

    missing = [f"--{n.replace('_', '-')}" for n in ("owner_key", "company", "model_id")
               if getattr(args, n) is None]
    if args.customer is None and default_customer is None:
        missing.append("--customer")
    if missing:
        raise SystemExit(f"sealnet protect {args.method} needs {', '.join(missing)}")
    return SerialRecord(args.company, args.model_id, int(time.time()) if args.timestamp is None else args.timestamp,
                        args.customer or default_customer)


@register
class DSN(ProtectionMethod):
    name = "dsn"
    summary = "Deep Serial Number: a per-customer student that works only on inputs the module stamps"
    user_model_refusal = ("the Deep Serial Number distils a sealnet teacher into sealnet's registry networks; a "
                          "user's network as teacher or student is not supported: use sealed-head (or transform)")
    module_step = PREPROCESS
    attack_module = "sealnet.attacks.serial_attacks"
    baseline_option = False  # the teacher plays the baseline

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_record_arguments(parser, "required: one student per customer")
        parser.add_argument("--teacher", type=Path, help="teacher checkpoint; trained with --epochs and written "
                                                         "here if missing, reused if present (default: OUT.teacher.pt)")
        parser.add_argument("--student-epochs", type=int, default=30, help="epochs of distillation")
        parser.add_argument("--pattern-size", type=_size, default=(3, 3), help="serial-number pattern HxW (bits)")
        parser.add_argument("--position", type=_position, default=(0, 0), help="ROW,COL of the stamp's top-left pixel")
        parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
        parser.add_argument("--grl-lambda", type=float, default=1.0, help="weight of the reversed gradient")
        parser.add_argument("--wrong-fraction", type=float, default=0.5,
                            help="share of the no-SN half stamped with wrong patterns (0: the paper)")
        parser.add_argument("--uniform-weight", type=float, default=0.3,
                            help="weight of the uniform-output term on inputs without the SN (0: the paper)")
        parser.add_argument("--no-teacher-init", dest="teacher_init", action="store_false",
                            help="start the student from random weights instead of the teacher's")
        parser.add_argument("--attempts", type=int, default=3,
                            help="students trained (seeds SEED, SEED+1, ...) until one meets the targets below")
        parser.add_argument("--max-sn-drop", type=float, default=0.02,
                            help="target: student with its SN at least teacher minus this (test split)")
        parser.add_argument("--max-raw-acc", type=float, default=0.2, help="target: student on raw inputs at most this")
        parser.add_argument("--max-other-acc", type=float, default=0.2,
                            help="target: student with any of 20 other customers' SNs at most this")

    def protect(self, args: argparse.Namespace) -> int:
        from sealnet.data import load_data_from_args
        from sealnet.licenses import load_owner_key
        from sealnet.protect.serial import DSNConfig, DSNTargets, DSNTrainingError, protect_dsn
        from sealnet.protect.train import TrainConfig
        from sealnet.serial import license_serial_number, serial_path

        record = serial_record(args, None)
        owner_key = load_owner_key(args.owner_key)
        data = load_data_from_args(args, seed=args.seed)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        claim = args.serial_out or serial_path(args.out)
        teacher = args.teacher or args.out.with_name(args.out.stem + ".teacher.pt")
        dcfg = DSNConfig(temperature=args.temperature, grl_lambda=args.grl_lambda, wrong_fraction=args.wrong_fraction,
                         uniform_weight=args.uniform_weight, teacher_init=args.teacher_init)
        student_cfg = TrainConfig(epochs=args.student_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        try:
            ckpt = protect_dsn(data, args.out, student_cfg, owner_key, record, dcfg=dcfg, teacher_path=teacher,
                               teacher_cfg=cfg, pattern_size=args.pattern_size, position=args.position,
                               model_config={"hidden": args.hidden}, claim_out=claim, attempts=args.attempts,
                               targets=DSNTargets(args.max_sn_drop, args.max_raw_acc, args.max_other_acc))
        except DSNTrainingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        m = ckpt.metrics
        print(f"checkpoint {args.out} (mode 0600: it holds the serial number), teacher {teacher}, claim {claim}")
        print(f"  teacher        accuracy {m['teacher_acc']:.2%}")
        print(f"  student + SN   accuracy {m['student_sn_acc']:.2%}  (customer {record.customer_id!r}, seed "
              f"{ckpt.seed}{', attempt ' + str(m['student_attempts']) if m['student_attempts'] > 1 else ''})")
        print(f"  student raw    accuracy {m['student_raw_acc']:.2%}  (no serial number: what a pirate gets)")
        print(f"  other SNs  max accuracy {m['other_sn_max_acc']:.2%}  ({m['other_sn_n']} other customers' SNs)")
        print(f"  license serial number {license_serial_number(ckpt.secret['commitment'])} (issue the customer's "
              f"license with --customer {record.customer_id} --serial it; export the student for deployment)")
        return 0

    def example_commands(self, work: Path, seed: int, out: Path) -> list[list[str]]:
        key = work / "dsn-owner.key"
        keygen = [] if key.exists() else [["license", "keygen", str(key)]]
        return [*keygen, ["protect", self.name, "--owner-key", str(key), "--company", "sealnet demo", "--customer",
                          "acme", "--model-id", "mnist-dsn", "--seed", str(seed), "--out", str(out)]]

    def license_fields(self, manifest: dict) -> dict[str, str]:
        """A student answers only the customer and serial number it was distilled for."""
        return {"customer_id": manifest["customer_id"], "serial_number": manifest["serial_number"]}

    def split(self, ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, options: ExportOptions,
              log: Callable[[str], None]) -> Split:
        return _split(ckpt, data, onnx_path, options.max_raw_acc, log)


def _split(ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, max_raw_acc: float,
           log: Callable[[str], None]) -> Split:
    """DSN: public.onnx is one customer's student; the sealed part is its stamp (pattern, position, scale) and
    the serial number and customer id a license must carry for the trusted module to stamp inputs."""
    import numpy as np

    from sealnet.protect.onnx_export import export_public_network
    from sealnet.serial import license_serial_number
    from sealnet.stamp import StampSpec

    spec = StampSpec.from_secret(ckpt.secret)
    checks = export_public_network(ckpt, data, spec.apply(data.x_test), onnx_path, max_raw_acc, log,
                                    "stamped with the serial number", "on raw (unstamped) inputs")
    serial = ckpt.secret["serial"]
    serial_number = license_serial_number(ckpt.secret["commitment"])
    config = {"method": DSN.name, "position": list(spec.position), "scale": spec.scale,
              "customer_id": serial["customer_id"], "serial_number": serial_number}
    arrays = {"pattern": spec.pattern.astype(np.float32)}
    return Split(config, arrays, checks, {"customer_id": serial["customer_id"], "serial_number": serial_number})
