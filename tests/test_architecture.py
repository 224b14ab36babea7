"""The import graph: no module cycles, no import from a lower stage to a higher one, and the trusted module's
code closed over enclave_sim/ and the sealnet core. Read from the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from sealnet.enclave_sim.measure import import_closure

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sealnet"
# Stages, lowest first (docs/architecture.md): the core (modules directly in sealnet/) is 0, each subpackage has
# its rank. A module imports only lower ranks, never a sibling package of its rank; nothing imports the CLI.
RANK = {"protect": 1, "enclave_sim": 1, "runtime": 1, "export": 2, "deployment": 3, "evaluate": 4, "attacks": 5,
        "bench": 5, "demo": 6, "cli": 7, "__main__": 8}
CORE = 0


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if "_grpc" in rel.parts or any(part.startswith(".") for part in rel.parts):
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


def _stage(module: str) -> str:
    """The stage a module belongs to: its subpackage of sealnet, or "core"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "core"


def _rank(module: str) -> int:
    return RANK.get(_stage(module), CORE)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_or_sideways_imports():
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            if _stage(module) != _stage(target) and _rank(target) >= _rank(module):
                bad.append(f"{module} -> {target}")
    assert sorted(bad) == []


def test_the_package_root_imports_nothing():
    """`import sealnet` (and so every stage, whose parent it is) loads no other project code."""
    assert _graph()["sealnet"] == set()


def test_every_subpackage_has_a_stage():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"_grpc"}
    assert packages == set(RANK) - {"__main__"}
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert include.strip() == '"sealnet*"'


def test_trusted_module_code_is_enclave_sim_and_the_core():
    files, third_party = import_closure()
    assert files and all(f.startswith("sealnet/") for f in files)
    assert {_stage(f.removesuffix(".py").removesuffix("/__init__").replace("/", ".")) for f in files} == {
        "core", "enclave_sim"}
    assert "torch" not in {m.partition(".")[0] for m in third_party}
    assert sys.stdlib_module_names.isdisjoint(m.partition(".")[0] for m in third_party)


# -- one object per method ------------------------------------------------------------------------------------
METHOD_FILES = ("sealnet/protect/methods/", "sealnet/enclave_sim/secrets/")


def _method_names() -> set[str]:
    from sealnet.enclave_sim.secrets import SECRETS
    from sealnet.protect.methods import METHODS

    return set(METHODS) | set(SECRETS)


def _compared_names(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every method name compared with ==, !=, in, not in or matched in a `case`."""
    def literals(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return [v for elt in node.elts for v in literals(elt)]
        return []

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn)
                                                 for op in node.ops):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found += [(node.lineno, v) for operand in operands for v in literals(operand) if v in names]
    return found


def test_no_module_outside_the_method_files_compares_a_method_name():
    """Method dispatch goes through the registries; adding a method touches its two files (plus tests, docs)."""
    names = _method_names()
    bad = []
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(METHOD_FILES):
            continue
        bad += [f"{rel}:{line}: {value!r}" for line, value in _compared_names(ast.parse(path.read_text()), names)]
    for path in [*(ROOT / "scripts").glob("*.py")]:
        bad += [f"scripts/{path.name}:{line}: {value!r}"
                for line, value in _compared_names(ast.parse(path.read_text()), names)]
    assert bad == []


def test_the_comparison_finder_finds_comparisons():
    tree = ast.parse('if m == "dsn" or m in ("passport", "x"):\n    pass\n'
                     'match m:\n    case "transform":\n        pass\n'
                     'y = {"method": "dsn"}\n')
    assert [v for _, v in _compared_names(tree, {"dsn", "passport", "transform"})] == ["dsn", "passport", "transform"]
