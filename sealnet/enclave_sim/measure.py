"""Measurements: what the trusted module's process runs, hashed in a fixed order into the keystore's chain.

The module measures itself at every start and export writes the same list into expected-measurements.json,
so both compute it here, from files only (never from what a process happens to have imported):
- `code:<path>`: every project file in the static import closure of the module's entry (`python -m
  enclave_sim`, which `sealnet enclave` execs): every `import` anywhere in a file counts, lazy ones inside
  functions included, so the set is a superset of what any run imports; parent packages' `__init__.py` too.
- `python:<implementation>-<version>`: the interpreter (sys.version and its executable's bytes).
- `dist:<name>==<version>`: each installed third-party distribution that the closure imports, and what those
  require (Requires-Dist, extras left out), hashed over the current contents of every file its RECORD lists.
  File contents rather than RECORD's own hashes: RECORD is written at install time, so an in-place edit of an
  installed file would leave it unchanged. Bytecode caches are left out: the module runs with a private
  pycache_prefix (enclave_sim/__main__.py), so it compiles the measured sources itself.
Then `bundle:manifest`, the manifest's digest. The chain format itself is in sealnet/evidence.py.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import os
import platform
import re
import site
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sealnet.evidence import MANIFEST_MEASUREMENT, Measurement, chain_of

_ROOT = Path(__file__).resolve().parent.parent.parent

ENTRY = "sealnet.enclave_sim.__main__"  # the module the trusted module's process runs (python -m sealnet.enclave_sim)
# The project's top-level packages (pyproject.toml's packages.find include): imports of these are project code.
PROJECT_PACKAGES = ("sealnet",)


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of every module `path` (module `name`) may import: `from a import b` yields a and a.b."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def import_closure(root: Path = _ROOT, entry: str = ENTRY) -> tuple[list[str], list[str]]:
    """(project files the entry may import, as sorted root-relative paths; the third-party module names)."""
    files: dict[str, Path] = {}
    third_party: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        top = name.partition(".")[0]
        if top not in PROJECT_PACKAGES:
            if top not in sys.stdlib_module_names:
                third_party.add(name)
            continue
        path = _module_file(root, name)
        if path is None:  # `from package import function`: a name inside a module, not a module
            continue
        files[name] = path
        parents = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]  # importing a.b.c runs a, a.b
        todo.extend(parents)
        todo.extend(_imported_names(path, name))
    return sorted(p.relative_to(root).as_posix() for p in files.values()), sorted(third_party)


def measure_code(root: Path = _ROOT) -> list[Measurement]:
    return [Measurement(f"code:{rel}", hashlib.sha256((root / rel).read_bytes()).digest())
            for rel in import_closure(root)[0]]


def measure_interpreter() -> Measurement:
    executable = Path(sys.executable).resolve()
    digest = hashlib.sha256(sys.version.encode() + b"\x00" + executable.read_bytes()).digest()
    return Measurement(f"python:{sys.implementation.name}-{platform.python_version()}", digest)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _installed() -> tuple[dict[str, importlib.metadata.Distribution], dict[str, str]]:
    """Installed distributions by canonical name, and which distribution owns each installed file (by the
    path RECORD lists, relative to its site directory)."""
    dists: dict[str, importlib.metadata.Distribution] = {}
    owner: dict[str, str] = {}
    # Only the site directories: the working directory (on sys.path in some processes, not in the module's, which
    # runs with -P) may hold a source tree's *.egg-info, and the measured set must not depend on where it starts.
    for dist in importlib.metadata.distributions(path=[str(d) for d in _site_dirs()]):
        name = _canonical(dist.metadata["Name"] or "")
        if not name or name in dists:  # the first site directory wins, as for imports
            continue
        dists[name] = dist
        for file in dist.files or ():
            owner.setdefault(file.as_posix(), name)
    return dists, owner


def _distribution_of(module: str, owner: dict[str, str]) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        base = "/".join(parts[:n])
        for candidate in (f"{base}.py", f"{base}/__init__.py",
                          *(base + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)):
            if candidate in owner:
                return owner[candidate]
    return None


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    return [_canonical(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
            for req in dist.requires or () if "extra ==" not in req and "extra==" not in req]


def _site_dirs() -> list[Path]:
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [Path(d) for d in dirs if Path(d).is_dir()]


def _startup_distributions(dists: dict[str, importlib.metadata.Distribution]) -> list[str]:
    """Distributions whose code every interpreter start runs: the owners of the .pth files in the site
    directories (an editable install's path finder, setuptools' distutils shim)."""
    out = []
    for directory in _site_dirs():
        for pth in sorted(directory.glob("*.pth")):
            out += [name for name, dist in dists.items()
                    if any(f.as_posix() == pth.name for f in dist.files or ())]
    return out


def _package_init_imports(dist: importlib.metadata.Distribution, owner: dict[str, str]) -> set[str]:
    """Distributions imported by the package __init__ files of `dist` (two levels deep): optional imports such
    as grpc's `try: import grpc_tools` that Requires-Dist does not list."""
    out = set()
    for file in dist.files or ():
        parts = file.parts
        if parts[-1] == "__init__.py" and len(parts) <= 3 and parts[0] not in PROJECT_PACKAGES:
            try:
                names = _imported_names(Path(dist.locate_file(file)), ".".join(parts[:-1]))
            except (OSError, SyntaxError, ValueError):
                continue
            out.update(d for d in (_distribution_of(n, owner) for n in names) if d)
    return out


def _file_digests(dist: importlib.metadata.Distribution) -> hashlib._Hash:
    digest = hashlib.sha256(f"{_canonical(dist.metadata['Name'])}=={dist.version}\n".encode())
    for file in sorted(dist.files or (), key=lambda f: f.as_posix()):
        rel = file.as_posix()
        # bytecode caches are not run (private pycache_prefix); project packages are measured as code:
        if rel.endswith(".pyc") or "__pycache__/" in rel or file.parts[0] in PROJECT_PACKAGES:
            continue
        try:
            content = hashlib.sha256(Path(dist.locate_file(file)).read_bytes()).hexdigest()
        except OSError:
            content = "missing"
        digest.update(f"{rel}\x00{content}\n".encode())
    return digest


@functools.cache
def _measure_distributions(third_party: tuple[str, ...]) -> tuple[Measurement, ...]:
    dists, owner = _installed()
    todo = sorted({d for d in (_distribution_of(m, owner) for m in third_party) if d})
    seen = set(_startup_distributions(dists))  # only their own files: their requirements are not run at start
    while todo:
        name = todo.pop()
        if name not in seen and name in dists:
            seen.add(name)
            todo.extend(_requirements(dists[name]))
            todo.extend(sorted(_package_init_imports(dists[name], owner)))
    names = sorted(seen)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # sha256 releases the GIL
        digests = list(pool.map(lambda name: _file_digests(dists[name]).digest(), names))
    return tuple(Measurement(f"dist:{name}=={dists[name].version}", d) for name, d in zip(names, digests, strict=True))


def measure_distributions(root: Path = _ROOT) -> list[Measurement]:
    """One measurement per third-party distribution the module may load (hashing them takes ~1 s once per
    process; the result is kept for the process's lifetime)."""
    return list(_measure_distributions(tuple(import_closure(root)[1])))


def measurement_chain(manifest_digest: bytes, root: Path = _ROOT) -> tuple[list[Measurement], bytes]:
    """All measurements (code, interpreter, distributions, then the manifest) and the resulting chain."""
    items = [*measure_code(root), measure_interpreter(), *measure_distributions(root),
             Measurement(MANIFEST_MEASUREMENT, manifest_digest)]
    return items, chain_of(items)
