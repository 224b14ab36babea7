"""ResNet_p-18 under passport scheme V1 on the embedded MNIST data, over several seeds: trains, exports, serves.

    python scripts/passport_resnet_table.py --seeds 3 --width 16 --out runs/passport-resnet   (~4 min a seed, 1 core)

For each seed s it runs the documented commands

    sealnet protect --method passport --model resnet18_p --width W --epochs E --seed s --out OUT/seed-s/r.pt
    sealnet passport-eval --checkpoint OUT/seed-s/r.pt --fakes 200 --skip ... --out OUT/seed-s/eval

(the evaluation exports the checkpoint with a fresh owner key, serves it through the trusted module and the
runtime, and measures public.onnx alone), then writes OUT/passport_resnet.json (every run) and
OUT/passport_resnet.md (mean [min, max]). A rerun with the same --out reuses the runs it finds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluate.multiseed import spread, summarize  # noqa: E402

SKIP = ("reverse", "reverse_svd", "insider", "pruning", "finetune", "image_fakes")  # kept: fakes, SVD, deploy
ROWS = (
    ("baseline_acc", "baseline (plain counterpart)"), ("valid_acc", "valid passport"),
    ("deployed_acc", "deployed: bundle + trusted module + gRPC"),
    ("public_onnx_acc", "public.onnx alone, shipped gamma/beta = 0"),
    ("public_unit_params_acc", "public.onnx, guess gamma = 1, beta = 0"),
    ("fake_max_acc", "200 random fake passports: max"), ("fake_mean_acc", "200 random fake passports: mean"),
    ("svd_attack_acc", "SVD attack, data-free"), ("signature_match", "signature recovered (share of runs)"),
)


def _sealnet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sealnet", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_seed(seed: int, width: int, epochs: int, out: Path) -> dict:
    run = out / f"seed-{seed}"
    report = run / "eval" / "passport_eval.json"
    if not report.exists():
        _sealnet("protect", "--method", "passport", "--model", "resnet18_p", "--width", str(width), "--epochs",
                 str(epochs), "--seed", str(seed), "--out", str(run / "r.pt"))
        _sealnet("passport-eval", "--checkpoint", str(run / "r.pt"), "--fakes", "200", "--out", str(run / "eval"),
                 *(f"--skip={s}" for s in SKIP))
    r = json.loads(report.read_text())
    return {key: float(r[key]) for key, _ in ROWS if isinstance(r.get(key), (bool, int, float))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/passport-resnet"))
    args = ap.parse_args()
    runs = [run_seed(s, args.width, args.epochs, args.out) for s in range(args.seeds)]
    summary = summarize(runs)
    (args.out / "passport_resnet.json").write_text(json.dumps({"width": args.width, "epochs": args.epochs,
                                                               "runs": runs, "summary": summary}, indent=2))
    lines = [f"# ResNet_p-18 (width {args.width}), scheme V1, embedded MNIST, {args.epochs} epochs, "
             f"{args.seeds} seeds", "", "| measurement | mean [min, max] |", "|---|---|"]
    lines += [f"| {label} | {spread(summary[key])} |" for key, label in ROWS if key in summary]
    (args.out / "passport_resnet.md").write_text("\n".join([*lines, ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
