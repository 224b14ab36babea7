"""The import graph: no module cycles, no import from a lower stage to a higher one, and the trusted module's
code closed over enclave_sim/ and the sealnet core. Read from the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from enclave_sim.measure import PROJECT_PACKAGES, import_closure

ROOT = Path(__file__).resolve().parent.parent
# Stages, lowest first (docs/architecture.md). A package imports only lower ranks, never a sibling of its rank.
RANK = {"sealnet": 0, "protect": 1, "enclave_sim": 1, "runtime": 1, "export": 2, "evaluate": 3, "attacks": 4,
        "bench": 4}
# Entry points (the CLIs and the demo) may import every stage; nothing but another entry imports them.
ENTRIES = {"sealnet.__main__", "sealnet.cli", "sealnet.passport_cli", "sealnet.serial_cli", "sealnet.attack_cli",
           "sealnet.sealed_head_cli",
           "sealnet.demo"}
TOP = max(RANK.values()) + 1


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in RANK or "_grpc" in rel.parts or any(part.startswith(".") for part in rel.parts):
            # hidden directories are environments (bench/.kserve-venv), not the project's code
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            targets.update(t for t in map(resolve, names) if t and t != name)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _rank(module: str) -> int:
    return TOP if module in ENTRIES else RANK[module.partition(".")[0]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_or_sideways_imports():
    bad = []
    for module, targets in _graph().items():
        if module in ENTRIES:
            continue
        for target in targets:
            same_package = module.partition(".")[0] == target.partition(".")[0] and target not in ENTRIES
            if not same_package and _rank(target) >= _rank(module):
                bad.append(f"{module} -> {target}")
    assert sorted(bad) == []


def test_every_package_has_a_stage():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RANK) == set(PROJECT_PACKAGES)
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert {name.strip(' "*') for name in include.split(",")} == set(RANK)


def test_trusted_module_code_is_enclave_sim_and_the_core():
    files, third_party = import_closure()
    assert files and all(f.startswith(("enclave_sim/", "sealnet/")) for f in files)
    assert not {f.removesuffix(".py").replace("/", ".") for f in files} & ENTRIES
    assert "torch" not in {m.partition(".")[0] for m in third_party}
    assert sys.stdlib_module_names.isdisjoint(m.partition(".")[0] for m in third_party)
