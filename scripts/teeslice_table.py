"""Stealing vs black-box access (TEESlice protocol) for every deployable method, over several seeds.

    python scripts/teeslice_table.py --seeds 3 --out runs/teeslice      (./dev sealnet ... for the environment)
    python scripts/teeslice_table.py --protect "sealed-head --model net.py:make --data imagefolder:DIR" --out runs/t

With --protect, the row is your own `sealnet protect` command instead (each seed adds --seed S --out FILE): your
model on your data, deployed and attacked the same way.

For each seed and method it trains the protected model with the documented command (`sealnet protect`, embedded
MNIST, default settings, that seed; a fresh owner key per seed), deploys it locally (trusted module + runtime),
and runs the `teeslice-stealing` attack (and `insider-imitation` for the sealed head) against the deployment.
Writes teeslice.json (every row; a rerun with the same --out skips the rows it holds), teeslice.md (mean [min, max]
per method and data fraction) and teeslice.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sealnet.attacks.base import BUDGETS, Target  # noqa: E402
from sealnet.attacks.plots import grouped_bars  # noqa: E402
from sealnet.attacks.registry import get_attack  # noqa: E402
from sealnet.attacks.teeslice import insider_imitation, teeslice_stealing  # noqa: E402
from sealnet.deployment import LocalDeployment  # noqa: E402
from sealnet.protect.methods import exportable, get_method  # noqa: E402

METHODS = tuple(exportable())


def _sealnet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sealnet", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def protect(method: str, seed: int, work: Path, command: str | None = None) -> Path:
    """The checkpoint of `method` made with its documented commands and this seed (or with `command`, the
    arguments of a user's own `sealnet protect`)."""
    out = work / f"{method}.pt"
    if command:
        _sealnet("protect", *shlex.split(command), "--seed", str(seed), "--out", str(out))
        return out
    for args in get_method(method).example_commands(work, seed, out):
        _sealnet(*args)
    return out


def measure(label: str, seed: int, work: Path, command: str | None = None) -> dict:
    ckpt = protect(label if command is None else "yours", seed, work, command)
    deploy = work / f"{label if command is None else 'yours'}-deploy"
    shutil.rmtree(deploy, ignore_errors=True)  # a row measured again gets a fresh owner key and keystore
    with LocalDeployment.export(ckpt, deploy) as dep:
        manifest = dep.manifest
        method = manifest["method"]
        fields = get_method(method).license_fields(manifest)
        token = dep.license(fields["customer_id"], fields["serial_number"]) if fields else dep.license()
        target = Target(dep.bundle, endpoint=dep.endpoint, enclave=dep.enclave, license=token, seed=seed)
        report = work / f"{method}-report"
        report.mkdir(exist_ok=True)
        row = {"method": label, "seed": seed, "authorized_acc": dep.accuracy(target.data.x_test, target.data.y_test,
                                                                                token),
               "stealing": teeslice_stealing(target, BUDGETS["small"], report).details["rows"]}
        if get_attack("insider-imitation").applies_to(method):
            insider = insider_imitation(target, BUDGETS["small"], report)
            row["insider_ratio"] = next(m.value for m in insider.metrics if m.name == "insider_ratio")
            row["insider"] = insider.details
    return row


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarise(rows: list[dict], out: Path, seeds: int) -> None:
    fractions = [r["fraction"] for r in rows[0]["stealing"]]
    lines = [f"Stealing vs black-box, {seeds} seed(s): mean [min, max] of best copy / best black-box copy "
             "(PASS at <= 1.05; `python scripts/teeslice_table.py`)", "",
             "| method | authorized | " + " | ".join(f"thief / black-box at {f:.1%}" for f in fractions)
             + " | insider / black-box |", "|---|---|" + "---|" * (len(fractions) + 1)]
    means: dict[str, list[float]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for i, _ in enumerate(fractions):
            ratios = [r["stealing"][i]["ratio"] for r in mine]
            cells.append(_spread(ratios))
            means.setdefault(method, []).append(float(np.mean(ratios)))
        insider = [r["insider_ratio"] for r in mine if "insider_ratio" in r]
        acc = [r["authorized_acc"] for r in mine]
        lines.append(f"| {method} | {_spread(acc)} | " + " | ".join(cells)
                     + f" | {_spread(insider) if insider else 'see the method attacks'} |")
    (out / "teeslice.md").write_text("\n".join(lines) + "\n")
    top = max(v for values in means.values() for v in values)
    grouped_bars(out / "teeslice.png", [f"{f:.1%}" for f in fractions], means,
                 title="Best copy / best black-box copy (mean over seeds)", ylabel="ratio", lines={"1.05": 1.05},
                 ylim=(0.9, max(1.1, top + 0.05)))  # ratios sit near 1: an axis from 0 would hide them
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "teeslice")
    parser.add_argument("--protect", metavar="ARGS",
                        help="your own `sealnet protect` arguments instead of the methods' documented commands")
    args = parser.parse_args()
    methods = [f"yours: {args.protect}"] if args.protect else args.methods
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "teeslice.json"
    rows = json.loads(done.read_text()) if done.is_file() else []  # a rerun resumes: measured rows are kept
    for seed in range(args.seeds):
        for method in methods:
            if any(r["method"] == method and r["seed"] == seed for r in rows):
                continue
            print(f"== seed {seed}: {method}", flush=True)
            rows.append(measure(method, seed, args.out / f"seed{seed}", args.protect))
            (args.out / "teeslice.json").write_text(json.dumps(rows, indent=1) + "\n")
    summarise(rows, args.out, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
