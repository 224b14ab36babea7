"""Results over several training seeds: one training run is not a result (a lucky seed looks like a method).

`flatten` turns one evaluation report into {metric path: number}; `summarize` gives mean, min and max of
each metric over the runs; `spread` formats one for a table: "97.0% [96.8, 97.3]".
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A list of dicts keyed by one of these is a table: rows named by that value.
ROW_KEYS = ("fraction", "rate", "flip_fraction")


def flatten(report: Any, prefix: str = "") -> dict[str, float]:
    """Every number (and bool, as 0/1) in a report, named by its path (`dsn.attacks@0.1.finetune_acc`). Rows of
    per-fraction / per-rate tables are named by that value; other lists (learning curves, per-SN accuracies)
    are left out: their entries are not the same measurement from run to run."""
    out: dict[str, float] = {}
    if isinstance(report, bool | int | float) and not isinstance(report, str):
        out[prefix] = float(report)
    elif isinstance(report, dict):
        for k, v in report.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(report, list) and report and all(isinstance(r, dict) for r in report):
        key = next((k for k in ROW_KEYS if all(k in r for r in report)), None)
        if key is not None:
            for r in report:
                out |= flatten({k: v for k, v in r.items() if k != key}, f"{prefix}@{r[key]:g}")
    return out


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, min, max, n}} over the flattened runs that have the metric."""
    keys = sorted({k for r in runs for k in r})
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs if k in r], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    return out


def spread(s: dict[str, float] | None, percent: bool = True, digits: int | None = None) -> str:
    """'97.0% [96.8, 97.3]' (mean [min, max]); one run: '97.0%'; missing: 'n/a'. Not a percentage: 3 significant
    digits, or `digits` decimals (ratios: '1.004 [1.000, 1.008]')."""
    if not s:
        return "n/a"
    scale, spec = (100, ".1f") if percent else (1, ".3g" if digits is None else f".{digits}f")

    def f(v: float) -> str:
        return f"{scale * v:{spec}}"
    unit = "%" if percent else ""
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{f(s['mean'])}{unit}"
    return f"{f(s['mean'])}{unit} [{f(s['min'])}, {f(s['max'])}]"
