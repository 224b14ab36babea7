"""One registry of attacks, so `sealnet attack --list` and the suites see every attack module.

An attack is a function `run(target, budget, out_dir) -> Outcome` registered with its suite ("model" or
"protocol"), the protection methods it applies to (None: any, e.g. protocol attacks) and the attacker
knowledge it assumes. A method's own attacks live in the module its method object names (`attack_module`,
sealnet/protect/methods/); the runner skips attacks whose methods do not include the bundle's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sealnet.attacks.base import Budget, Outcome, Target
from sealnet.protect.methods import METHODS

SUITES = ("model", "protocol")
# Modules that register attacks when imported: each method's own, then those that apply across methods.
ATTACK_MODULES = (*(m.attack_module for m in METHODS.values() if m.attack_module),
                  *(f"sealnet.attacks.{name}" for name in ("stealing", "teeslice", "protocol")))

RunFn = Callable[[Target, Budget, Path], Outcome]


@dataclass(frozen=True)
class AttackSpec:
    name: str
    suite: str
    title: str
    knowledge: str  # the attacker and what they are assumed to know / hold
    targets: str  # the thresholds its metrics are judged against, in words
    methods: tuple[str, ...] | None
    run: RunFn

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods


_REGISTRY: dict[str, AttackSpec] = {}


def register_attack(name: str, *, suite: str, title: str, knowledge: str, targets: str,
                    methods: tuple[str, ...] | None = None) -> Callable[[RunFn], RunFn]:
    """Register `run` under `name`; registration order is the order a suite runs in."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")

    def wrap(fn: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise ValueError(f"attack {name!r} is already registered")
        _REGISTRY[name] = AttackSpec(name, suite, title, knowledge, targets, methods, fn)
        return fn

    return wrap


def _load() -> None:
    for module in ATTACK_MODULES:
        importlib.import_module(module)


def all_attacks() -> list[AttackSpec]:
    """Every attack, in suite order: by module as listed in ATTACK_MODULES, then by registration."""
    _load()
    order = {module: i for i, module in enumerate(ATTACK_MODULES)}
    return sorted(_REGISTRY.values(), key=lambda a: order.get(a.run.__module__, len(order)))


def get_attack(name: str) -> AttackSpec:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(_REGISTRY)}") from None


def select(suite: str, names: list[str] | None = None) -> list[AttackSpec]:
    """Attacks of `suite` ("model", "protocol" or "all"), optionally only those named."""
    if suite not in (*SUITES, "all"):
        raise ValueError(f"--suite must be one of {', '.join((*SUITES, 'all'))}, got {suite!r}")
    chosen = [a for a in all_attacks() if suite == "all" or a.suite == suite]
    if names:
        wanted = {get_attack(n).name for n in names}
        chosen = [a for a in chosen if a.name in wanted]
        if not chosen:
            raise ValueError(f"none of {', '.join(sorted(wanted))} belongs to suite {suite!r}")
    return chosen
