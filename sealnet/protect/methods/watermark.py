"""Serial-number watermarks (Xu & Yuan): a trigger set makes the output layer emit a CA-endorsed serial
number. They identify a distributed copy (`sealnet verify --trigger`); they are not deployed through the
trusted module, so this method has no split."""

from __future__ import annotations

import argparse
from pathlib import Path

from sealnet.protect.methods.base import ProtectionMethod, register
from sealnet.protect.methods.dsn import add_record_arguments, serial_record


@register
class Watermark(ProtectionMethod):
    name = "watermark"
    summary = "serial-number watermark (Xu & Yuan): a trigger set makes the outputs spell a CA-endorsed serial"
    user_model_refusal = ("the serial-number watermark trains a sealnet registry network on its trigger set; "
                          "a user's network is not supported: use sealed-head (or transform)")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_record_arguments(parser, "default 'all'")
        parser.add_argument("--trigger-size", type=int, default=100, help="trigger images")
        parser.add_argument("--trigger-seed", type=int, help="seed of the trigger set (default: random)")
        parser.add_argument("--tolerance", type=float, help="max |logit - i| for a match (default: half a level, 1)")
        parser.add_argument("--trigger-out", type=Path, help="trigger file (default: OUT.trigger.npz, 0600)")

    def protect(self, args: argparse.Namespace) -> int:
        import torch

        from sealnet.data import load_data_from_args
        from sealnet.licenses import load_owner_key
        from sealnet.protect.onnx_export import INPUT_NAME, export_onnx
        from sealnet.protect.train import TrainConfig
        from sealnet.protect.watermark import WatermarkConfig, protect_watermark
        from sealnet.serial import DEFAULT_TOLERANCE, serial_path, trigger_path

        record = serial_record(args, "all")
        owner_key = load_owner_key(args.owner_key)
        data = load_data_from_args(args, seed=args.seed)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        claim = args.serial_out or serial_path(args.out)
        wcfg = WatermarkConfig(trigger_size=args.trigger_size,
                               tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
        trig = args.trigger_out or trigger_path(args.out)
        ckpt = protect_watermark(data, args.out, cfg, owner_key, record, wcfg=wcfg,
                                 model_config={"hidden": args.hidden}, baseline=not args.no_baseline,
                                 trigger_seed=args.trigger_seed, trigger_out=trig, claim_out=claim)
        m = ckpt.metrics
        onnx_path = args.out.with_suffix(".onnx")  # the model as distributed; the watermark travels inside it
        export_onnx(ckpt.build_public_model(), (torch.zeros(1, *ckpt.input_shape),), onnx_path, [INPUT_NAME])
        print(f"checkpoint {args.out}, ONNX {onnx_path}, trigger file {trig} (0600: the verification secret), "
              f"claim {claim}")
        if "baseline_acc" in m:
            print(f"  baseline    accuracy {m['baseline_acc']:.2%}  (plain model, same recipe)")
        print(f"  watermarked accuracy {m['watermark_task_acc']:.2%}")
        print(f"  serial number {'recovered' if m['watermark_match'] else 'NOT recovered'}: {m['watermark_rate']:.0%} "
              f"of {args.trigger_size} trigger images within ±{wcfg.tolerance:g} of i")
        return 0
