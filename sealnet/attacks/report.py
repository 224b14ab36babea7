"""Run a suite and write report.json, report.md (first table: the PASS/FAIL summary) and the PNG plots."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealnet.attacks.base import Budget, Metric, Outcome, Skip, Target
from sealnet.attacks.registry import AttackSpec


@dataclass
class AttackResult:
    spec: AttackSpec
    seconds: float
    outcome: Outcome | None = None
    skipped: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attack": self.spec.name, "suite": self.spec.suite, "title": self.spec.title,
                               "knowledge": self.spec.knowledge, "seconds": round(self.seconds, 1)}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        if self.outcome is not None:
            out["metrics"] = [_metric_dict(self.spec.name, m) | {"unit": m.unit, "note": m.note}
                              for m in self.outcome.metrics]
            out |= {"details": self.outcome.details, "notes": self.outcome.notes, "plots": self.outcome.plots}
        return out


@dataclass
class Report:
    target: dict[str, Any]
    budget: Budget
    results: list[AttackResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict[str, Any]]:
        return [_metric_dict(r.spec.name, m) for r in self.results if r.outcome for m in r.outcome.metrics]

    @property
    def failed(self) -> bool:
        return any(row["passed"] is False for row in self.summary()) or any(r.error for r in self.results)


def _metric_dict(attack: str, m: Metric) -> dict[str, Any]:
    return {"attack": attack, "metric": m.name, "value": m.value, "threshold": m.threshold, "passed": m.passed}


def run_attacks(target: Target, attacks: list[AttackSpec], budget: Budget, out_dir: Path,
                log=print, only_applicable: bool = False) -> Report:
    """Run each attack in order; a skipped or failing attack is recorded and the suite goes on.

    `only_applicable` leaves out, silently, the attacks written for other protection methods (a whole suite);
    otherwise they are reported as skipped (attacks asked for by name)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if only_applicable:
        attacks = [spec for spec in attacks if spec.applies_to(target.method)]
    report = Report(target.describe(), budget)
    started = time.perf_counter()
    for spec in attacks:
        log(f"== {spec.name}: {spec.title}")
        t0 = time.perf_counter()
        result = AttackResult(spec, 0.0)
        if not spec.applies_to(target.method):
            result.skipped = f"applies to {', '.join(spec.methods or ())} bundles; this one is {target.method!r}"
        else:
            try:
                result.outcome = spec.run(target, budget, out_dir)
            except Skip as exc:
                result.skipped = str(exc)
            except Exception as exc:  # noqa: BLE001 - one broken attack must not hide the others' results
                result.error = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc(limit=3))
        result.seconds = time.perf_counter() - t0
        log(f"   {_one_line(result)} ({result.seconds:.1f} s)")
        report.results.append(result)
    report.seconds = time.perf_counter() - started
    write_reports(report, out_dir)
    return report


def _one_line(result: AttackResult) -> str:
    if result.skipped:
        return f"SKIPPED: {result.skipped}"
    if result.error:
        return f"ERROR: {result.error}"
    assert result.outcome is not None
    return "; ".join(f"{m.name} {_fmt(m.value, m.unit)} {_verdict(m.passed)}" for m in result.outcome.metrics)


def _fmt(value: float, unit: str) -> str:
    if unit == "acc":
        return f"{100 * value:.2f}%"
    if unit == "count":
        return f"{value:g}"
    return f"{value:.3g}"


def _fmt_threshold(m: dict[str, Any], unit: str) -> str:
    if m["threshold"] is None:
        return "—"
    op, limit = m["threshold"].split(" ", 1)
    return f"{op.replace('<=', '≤').replace('>=', '≥')} {_fmt(float(limit), unit)}"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[passed]


def write_reports(report: Report, out_dir: Path) -> None:
    data = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(report.seconds, 1),
            "target": report.target, "budget": vars(report.budget), "summary": report.summary(),
            "attacks": [r.as_dict() for r in report.results]}
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    (out_dir / "report.md").write_text(markdown(report))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def markdown(report: Report) -> str:
    units = {(r.spec.name, m.name): m.unit for r in report.results if r.outcome for m in r.outcome.metrics}
    lines = ["| attack | metric | value | threshold | result |", "|---|---|---|---|---|"]
    for row in report.summary():
        unit = units[(row["attack"], row["metric"])]
        lines.append(f"| {row['attack']} | {row['metric']} | {_fmt(row['value'], unit)} | "
                     f"{_fmt_threshold(row, unit)} | {_verdict(row['passed'])} |")
    t = report.target
    passed = sum(r["passed"] is True for r in report.summary())
    failed = sum(r["passed"] is False for r in report.summary())
    head = [f"# sealnet attack report: {t['model_id']} ({t['method']}/{t['variant']})", "", *lines, "",
            f"{passed} PASS, {failed} FAIL, budget {report.budget.name}, {report.seconds:.0f} s. "
            "`info` rows are observations without a target.", ""]
    not_run = [f"- **{r.spec.name}**: {'SKIPPED: ' + r.skipped if r.skipped else 'ERROR: ' + r.error}"
               for r in report.results if r.skipped or r.error]
    head += [*not_run, *([""] if not_run else []), "## Target", "", *[f"- {k}: {v}" for k, v in t.items()], ""]
    for r in report.results:
        if r.outcome is None:
            continue
        head += [f"## {r.spec.name}: {r.spec.title}", "", f"*Attacker:* {r.spec.knowledge}", ""]
        for m in r.outcome.metrics:
            note = f" — {m.note}" if m.note else ""
            head.append(f"- {m.name}: {_fmt(m.value, m.unit)} ({_verdict(m.passed)}){note}")
        head += [f"- {n}" for n in r.outcome.notes]
        head += [f"\n![{p}]({p})" for p in r.outcome.plots]
        head.append("")
    return "\n".join(head) + "\n"
