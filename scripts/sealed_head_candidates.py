"""Measure the public-backbone candidates of the sealed-head method on the embedded MNIST data (docs/sealed_head.md).

For each seed: the unprotected baseline (simple_cnn trained on the private data; also the head's teacher), then for
each candidate backbone source (`sealnet backbone make --source ...`) the backbone + sealed head trained through
protect_sealed_head, the code path `sealnet protect sealed-head` runs. Prints a table (mean, min/max over
seeds) and writes every number as JSON.

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/sealed_head_candidates.py --seeds 0 1 2 --out runs/sh_cand.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from sealnet.data import load_dataset
from sealnet.protect.backbones import SOURCES, make_public_backbone
from sealnet.protect.sealed_head import SealedHeadConfig, protect_sealed_head
from sealnet.protect.train import TrainConfig, accuracy, train_new_model


def _stats(vals: list[float]) -> dict:
    return {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)), "n": len(vals)}


def measure(seeds: list[int], sources: list[str], workdir: Path, head: SealedHeadConfig,
            backbone_epochs: int, kd_weights: list[float]) -> dict:
    runs: list[dict] = []
    for seed in seeds:
        data = load_dataset("mnist-embedded", seed=seed)
        start = time.perf_counter()
        teacher, _ = train_new_model(data, TrainConfig(epochs=head.teacher_epochs, seed=seed, progress=False),
                                     head.teacher_model)
        baseline = accuracy(teacher, data.x_test, data.y_test)
        print(f"seed {seed}: baseline {baseline:.2%} ({time.perf_counter() - start:.0f} s)", flush=True)
        for source in sources:
            start = time.perf_counter()
            weights = make_public_backbone("tap_cnn", seed, workdir / f"{source}-{seed}.pt", kind=source,
                                           epochs=backbone_epochs)
            made = time.perf_counter() - start
            for kd in kd_weights:
                start = time.perf_counter()
                # max_drop=1: measure every run, including the ones the guard of `sealnet protect` would refuse.
                run = replace(head, seed=seed, attempts=1, max_drop=1.0, kd_weight=kd)
                m = protect_sealed_head(data, weights, "tap_cnn", run, teacher=teacher, progress=False).metrics
                name = f"{source}, kd {kd:g}"
                runs.append({"seed": seed, "candidate": name, "source": source, "kd_weight": kd,
                             "baseline_acc": baseline, "authorized_acc": m["authorized_acc"],
                             "backbone_flops": m["backbone_flops"], "head_flops": m["head_flops"],
                             "flops_ratio": m["flops_ratio"], "backbone_make_s": made,
                             "head_s": time.perf_counter() - start})
                print(f"  {name:16s} authorized {m['authorized_acc']:.2%}  (backbone made in {made:.0f} s, head "
                      f"{runs[-1]['head_s']:.0f} s, head/backbone FLOPs {m['flops_ratio']:.1%})", flush=True)
    baselines = [r["baseline_acc"] for r in runs if r["candidate"] == runs[0]["candidate"]]
    summary = {"baseline (simple_cnn)": _stats(baselines)}
    for name in dict.fromkeys(r["candidate"] for r in runs):
        mine = [r for r in runs if r["candidate"] == name]
        gaps = [r["baseline_acc"] - r["authorized_acc"] for r in mine]
        summary[name] = _stats([r["authorized_acc"] for r in mine]) | {"gap_mean": float(np.mean(gaps)),
                                                                       "gap_max": float(np.max(gaps))}
    return {"runs": runs, "summary": summary, "head_config": dict(vars(head)),
            "backbone_epochs": backbone_epochs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--backbone-epochs", type=int, default=8, help="--source digits: training epochs")
    p.add_argument("--kd-weights", type=float, nargs="+", default=[0.0, 0.7],
                   help="heads to train per backbone: share of distillation from the baseline")
    p.add_argument("--workdir", type=Path, default=Path("runs/sealed_head_candidates"))
    p.add_argument("--out", type=Path, default=Path("runs/sealed_head_candidates.json"))
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = measure(args.seeds, args.sources, args.workdir, SealedHeadConfig(), args.backbone_epochs, args.kd_weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'candidate (tap_cnn)':24s} {'accuracy mean':>14s} {'min':>8s} {'max':>8s} {'baseline - it':>16s}")
    for key, s in result["summary"].items():
        gap = f"{s['gap_mean'] * 100:+.2f} pts" if "gap_mean" in s else ""
        print(f"{key:24s} {s['mean']:14.2%} {s['min']:8.2%} {s['max']:8.2%} {gap:>16s}")
    print(f"(seeds {args.seeds}; {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
