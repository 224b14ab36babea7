"""CLI of the passport method's checks: `sealnet verify` (passport + signature) and `sealnet passport-eval`.

Torch-free at import time (the parser is built on every `sealnet` call); the commands import the rest lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


# -- sealnet verify -------------------------------------------------------------------------------------------
def add_verify_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sealnet.data import DATASETS

    p = sub.add_parser("verify", help="verify ownership: passport + signature (--checkpoint / --bundle), or a "
                                      "serial-number watermark (--trigger)")
    p.add_argument("--checkpoint", type=Path, help="protected checkpoint (the suspect's weights)")
    p.add_argument("--bundle", type=Path, help="instead: a deployed V1 passport bundle (its public.onnx weights)")
    p.add_argument("--passport", type=Path, help="owner's passport file (default: CHECKPOINT.passport.pt; "
                                                 "required with --bundle)")
    p.add_argument("--signature", help="the claimed ASCII signature")
    p.add_argument("--dataset", choices=DATASETS, help="test data for fidelity (default: the checkpoint's)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--epsilon", type=float,
                   help="fidelity threshold eps_f (default: the checkpoint's, 0.03; --bundle: 0.03)")
    p.add_argument("--trigger-threshold", type=float, default=0.95)
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.set_defaults(func=cmd_verify)
    return p


def cmd_verify(args: argparse.Namespace) -> int:
    from sealnet.data import load_dataset
    from sealnet.evaluate.passport_eval import verify_checkpoint
    from sealnet.protect.checkpoint import load_checkpoint
    from sealnet.protect.passport_train import default_passport_path

    if args.bundle is not None:
        return _verify_bundle(args)
    ckpt = load_checkpoint(args.checkpoint)
    data = load_dataset(args.dataset or ckpt.dataset, args.data_dir, seed=ckpt.seed)
    trigger_predict, close = None, None
    if args.onnx or args.endpoint:  # V3: the trigger set goes to the suspect
        from sealnet.cli.serial import suspect_predict

        trigger_predict, close = suspect_predict(args, ckpt.model_name)
    try:
        res = verify_checkpoint(args.checkpoint, args.passport or default_passport_path(args.checkpoint),
                                args.signature, data, eps_f=args.epsilon, trigger_threshold=args.trigger_threshold,
                                trigger_predict=trigger_predict)
    finally:
        if close is not None:
            close()
    return _report(args, res)


def _verify_bundle(args: argparse.Namespace) -> int:
    from sealnet.bundle import load_bundle
    from sealnet.data import load_dataset
    from sealnet.evaluate.passport_eval import verify_bundle

    if args.passport is None:
        raise ValueError("verify --bundle: pass --passport (the owner's passport file)")
    checks = load_bundle(args.bundle).manifest.get("checks", {})
    data = load_dataset(args.dataset or checks.get("dataset", "mnist-embedded"), args.data_dir, seed=0)
    return _report(args, verify_bundle(args.bundle, args.passport, args.signature, data, eps_f=args.epsilon))


def _report(args: argparse.Namespace, res: Any) -> int:
    """Print a VerificationResult (and --json it); exit status 0 when verified."""
    print(f"ownership {'VERIFIED' if res.verified else 'NOT verified'}")
    print(f"  signature: {res.signature_bits_matched}/{res.signature_bits} bits match "
          f"(decoded {res.signature_decoded!r})")
    if res.accuracy is not None:
        rec = "n/a" if res.recorded_acc is None else f"{res.recorded_acc:.2%}"
        print(f"  fidelity:  accuracy {res.accuracy:.2%} with the passport, recorded {rec}, eps_f {res.eps_f:.0%}")
    if res.trigger_acc is not None:
        where = args.endpoint or args.onnx or "the checkpoint's public branch"
        print(f"  trigger:   {res.trigger_acc:.2%} of the trigger set detected by {where} "
              f"(threshold {res.trigger_threshold:.0%})")
    for reason in res.reasons:
        print(f"  - {reason}")
    if args.json:
        args.json.write_text(json.dumps(res.to_dict(), indent=2))
    return 0 if res.verified else 1


# -- sealnet passport-eval ------------------------------------------------------------------------------------
def add_passport_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sealnet.data import DATASETS

    p = sub.add_parser("passport-eval", help="valid vs fake passports, reverse engineering, pruning, fine-tuning")
    p.add_argument("--checkpoint", type=Path, required=True, help="a --method passport checkpoint")
    p.add_argument("--passport", type=Path, help="owner's passport file (default: CHECKPOINT.passport.pt)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/passport-eval"), help="report directory")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--fakes", type=int, default=200, help="number of random fake passports")
    p.add_argument("--rev-epochs", type=int, default=3, help="epochs of the reverse-engineering attack")
    p.add_argument("--rev-target", choices=["params", "passport"], default="params",
                   help="reverse-engineer gamma/beta directly or a new passport")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--cerb-steps", type=int, default=300, help="training steps of each CERB forgery")
    p.add_argument("--signature", help="also verify this claimed signature")
    p.add_argument("--skip", action="append", default=[],
                   choices=["svd", "reverse", "reverse_svd", "insider", "forgery", "cerb", "pruning", "finetune",
                            "image_fakes", "deploy"], help="leave out a measurement (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="N > 1: train N new passport nets with the checkpoint's recipe and --signature (training "
                        "seeds checkpoint seed + i: new passports), evaluate each, and report mean and min/max "
                        "(OUT/passport_eval_seeds.json, OUT/seed-i/)")
    p.set_defaults(func=cmd_passport_eval)
    return p


def cmd_passport_eval(args: argparse.Namespace) -> int:
    from sealnet.data import load_dataset
    from sealnet.evaluate.passport_eval import markdown_report, run_passport_eval
    from sealnet.protect.checkpoint import load_checkpoint
    from sealnet.protect.passport_train import default_passport_path, load_passport_file

    ckpt = load_checkpoint(args.checkpoint)
    secret = load_passport_file(args.passport or default_passport_path(args.checkpoint))
    data = load_dataset(args.dataset or ckpt.dataset, args.data_dir, seed=ckpt.seed)
    if args.seeds > 1:
        from sealnet.evaluate.passport_eval import passport_seeds_markdown, run_passport_eval_seeds

        if args.signature is None:
            raise SystemExit("sealnet passport-eval --seeds: give --signature (the new nets embed it)")
        r = run_passport_eval_seeds(ckpt, secret, data, args.out, args.seeds, args.signature, seed=args.seed,
                                    log=lambda m: print(m, file=sys.stderr), n_fakes=args.fakes,
                                    rev_epochs=args.rev_epochs, rev_target=args.rev_target,
                                    finetune_epochs=args.finetune_epochs, skip=tuple(args.skip), progress=False,
                                    data_dir=args.data_dir, cerb_steps=args.cerb_steps)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(r, indent=2))
        print(passport_seeds_markdown(r))
        return 0
    r = run_passport_eval(ckpt, secret, data, args.out, n_fakes=args.fakes, seed=args.seed,
                          rev_epochs=args.rev_epochs, rev_target=args.rev_target,
                          finetune_epochs=args.finetune_epochs, signature=args.signature, skip=tuple(args.skip),
                          progress=True, checkpoint_path=args.checkpoint, data_dir=args.data_dir,
                          cerb_steps=args.cerb_steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    print(markdown_report(r))
    print(f"report: {args.out}/passport_eval.{{json,md}}, {args.out}/passport_hist.png, "
          f"{args.out}/passport_attacks.png", file=sys.stderr)
    return 0
