"""PNG plots for the report (matplotlib, headless), where a person would rather look than read numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads


def _finish(fig, ax, path: Path, title: str, ylabel: str, lines: dict[str, float]) -> None:
    for i, (label, value) in enumerate(lines.items()):
        ax.axhline(value, linestyle=("--", ":", "-.")[i % 3], color=("C3", "C2", "C7")[i % 3], label=label)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histogram(path: Path, values: list[float], *, title: str, xlabel: str, marks: dict[str, float]) -> None:
    """Distribution of an attack's per-trial accuracies, with reference accuracies as vertical lines."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(values, bins=50, range=(0, 1), color="C0", alpha=0.8, label="trials")
    for i, (label, value) in enumerate(marks.items()):
        ax.axvline(value, linestyle=("--", ":", "-.")[i % 3], color=("C3", "C2", "C7")[i % 3], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("trials")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
                 lines: dict[str, float], ylim: tuple[float, float] | None = (0, 1)) -> None:
    """One group of bars per condition (e.g. pair fraction), one bar per series (e.g. mean / best)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups,
                  rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
    if ylim:
        ax.set_ylim(*ylim)
    _finish(fig, ax, path, title, ylabel, lines)
