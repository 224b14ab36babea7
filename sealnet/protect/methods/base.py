"""The method interface and the registry (imported by every method file)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sealnet.bundle import MODULE_STEPS
from sealnet.errors import ExportError

if TYPE_CHECKING:
    from sealnet.data import Dataset
    from sealnet.protect.checkpoint import ProtectedCheckpoint
    from sealnet.protect.user_args import UserModelChoice





@dataclass
class Split:
    config: dict[str, Any]  # sealed: method-specific settings the trusted module needs
    arrays: dict[str, np.ndarray]  # sealed: the secret tensors
    checks: dict[str, Any]  # recorded in the manifest
    manifest: dict[str, Any] = field(default_factory=dict)  # method-specific manifest fields
    outputs: list[dict[str, Any]] | None = None  # the endpoint's output tensors; None: the network's logits


@dataclass(frozen=True)
class ExportOptions:
    """The export settings a method's split reads (`sealnet export` flags)."""

    max_raw_acc: float = 0.2
    output_policy: str | None = None  # methods whose module answers under an output policy (sealed head)


@dataclass(frozen=True)
class DemoPlan:
    """What `sealnet demo --method NAME` runs: `train(data, workdir, epochs, seed)` writes
    WORKDIR/protected.pt and returns its checkpoint; `stealing` adds the TEESlice thief and insider rows."""

    model_id: str
    story: str  # the demo's first step, as printed
    train: Callable[[Dataset, Path, int, int], ProtectedCheckpoint]
    stealing: bool = False
    # `sealnet demo --model ...`: train_user(choice, workdir, epochs, seed) -> (the user's data, checkpoint)
    train_user: Callable[[UserModelChoice, Path, int, int], tuple[Dataset, ProtectedCheckpoint]] | None = None


class ProtectionMethod:
    """One protection method. Subclasses set the class attributes and override what applies to them."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `sealnet protect --help`
    # The data call the trusted module serves for this method's bundles; None: not deployed through the module.
    module_step: ClassVar[str | None] = None
    takes_output_policy: ClassVar[bool] = False
    # The module of sealnet.attacks that registers this method's own attacks (the generic ones apply anyway).
    attack_module: ClassVar[str | None] = None
    baseline_option: ClassVar[bool] = True  # the method trains an unprotected baseline unless --no-baseline
    # Why `sealnet protect NAME --model ...` (a user's own network) is refused; None: the method takes one.
    user_model_refusal: ClassVar[str | None] = ("a user's network is not supported by this method yet; protect it "
                                                "with sealed-head or transform")
    own_model_flag: ClassVar[bool] = False  # the method's own --model flag names one of its networks

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The method's own flags of `sealnet protect NAME` (the common ones are added by the CLI)."""

    def protect(self, args: argparse.Namespace) -> int:
        """Train from the parsed flags, write the checkpoint, print what it reached; the exit code."""
        raise NotImplementedError

    def split(self, ckpt: ProtectedCheckpoint, data: Dataset, onnx_path: Path, options: ExportOptions,
              log: Callable[[str], None]) -> Split:
        """Write public.onnx, check it is useless alone and right with the secret; return what gets sealed."""
        raise ExportError(f"checkpoint method {self.name!r} is not deployed through the trusted module "
                          f"(exportable: {', '.join(exportable())})")

    def example_commands(self, work: Path, seed: int, out: Path) -> list[list[str]]:
        """`sealnet` argument lists that protect with this method's documented defaults on the embedded data
        (training seed `seed`, checkpoint `out`, other files under `work`): scripts/teeslice_table.py runs them."""
        return []

    def license_fields(self, manifest: dict) -> dict[str, str]:
        """What a license for this method's bundle must name beyond the model (customer_id, serial_number)."""
        return {}

    def model_id_suffix(self, ckpt: ProtectedCheckpoint) -> str:
        """The default model id is `<network>-<suffix>`."""
        return self.name

    def demo(self) -> DemoPlan | None:
        """The demo's training step, where `sealnet demo --method NAME` runs this method."""
        return None


METHODS: dict[str, ProtectionMethod] = {}


def register(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    """Class decorator: add one instance of the method to the registry under its name."""
    if cls.module_step not in (None, *MODULE_STEPS):
        raise ValueError(f"method {cls.name}: module_step {cls.module_step!r} is not one of {MODULE_STEPS}")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> ProtectionMethod:
    """The registered method, or a ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown protection method {name!r} (known: {', '.join(METHODS)})") from None


def exportable() -> list[str]:
    """Methods whose bundles the trusted module serves."""
    return [name for name, method in METHODS.items() if method.module_step is not None]


def with_demo() -> list[str]:
    """Methods `sealnet demo --method` runs."""
    return [name for name, method in METHODS.items() if method.demo() is not None]


