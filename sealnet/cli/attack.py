"""`sealnet attack`: run the security testers' suite against a bundle and its services, or a demo target.

Exit status: 0 when every judged metric passes, 1 when one fails (or an attack errored), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from sealnet.attacks.base import BUDGETS, Target
from sealnet.attacks.registry import SUITES, all_attacks, select
from sealnet.protect.methods import with_demo


def add_attack_parser(sub) -> None:
    """Register `sealnet attack` on the CLI's subparsers."""
    p = sub.add_parser("attack", help="run the security testers' attack suite and write a report",
                       description="Attack a bundle (model attacks) and its live services (protocol attacks); "
                                   "writes report.json, report.md and PNG plots into --out.")
    p.add_argument("--list", action="store_true", help="list the attacks, their suites and thresholds, and exit")
    p.add_argument("--suite", default="all", choices=[*SUITES, "all"])
    p.add_argument("--attack", action="append", metavar="NAME", help="run only this attack (repeatable)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--bundle", type=Path, help="bundle directory to attack")
    target.add_argument("--demo", action="store_true",
                        help="build the demo's protected bundle and start its own trusted module + runtime")
    p.add_argument("--endpoint", help="runtime (KServe v2 gRPC) address, HOST:PORT or unix:PATH")
    p.add_argument("--enclave", help="trusted module address, unix:PATH or HOST:PORT (mTLS: --enclave-tls)")
    p.add_argument("--enclave-tls", type=Path, help="mTLS directory (sealnet certs) for a TCP trusted module")
    p.add_argument("--license-file", type=Path, help="a valid license for the bundle's model (never printed)")
    p.add_argument("--owner-key", type=Path, help="owner signing key, if lent for the test: mints expired / "
                                                 "other-model licenses")
    p.add_argument("--revoked-license-file", type=Path, help="a license the trusted module has revoked")
    p.add_argument("--enclave-pid", type=int, help="the trusted module's process id: allows the suite to SIGKILL "
                                                  "it to test fail-closed behaviour (it is not restarted)")
    p.add_argument("--data-dir", type=Path, help="local data when the bundle's dataset needs it")
    p.add_argument("--out", type=Path, default=Path("runs/attack-report"), help="report directory")
    p.add_argument("--budget", default="small", choices=sorted(BUDGETS), help="small: minutes; full: paper-sized")
    p.add_argument("--fuzz-requests", type=int, help="fuzzed requests per service (default: from the budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/attack-demo"), help="--demo: where to build (replaced)")
    p.add_argument("--epochs", type=int, default=8, help="--demo: training epochs")
    p.add_argument("--method", choices=with_demo(), default="transform",
                   help="--demo: the protection method of the demo bundle")
    p.set_defaults(func=cmd_attack)


def _read_token(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{flag} {path}: the file is empty")
    return token


def _kill_pid(pid: int):
    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    return kill


def list_attacks() -> None:
    rows = [(a.name, a.suite, ",".join(a.methods) if a.methods else "any", a.targets) for a in all_attacks()]
    widths = [max(len(r[i]) for r in [("attack", "suite", "methods", "target"), *rows]) for i in range(3)]
    print(f"{'attack':<{widths[0]}}  {'suite':<{widths[1]}}  {'methods':<{widths[2]}}  target")
    for name, suite, methods, targets in rows:
        print(f"{name:<{widths[0]}}  {suite:<{widths[1]}}  {methods:<{widths[2]}}  {targets}")


def _validate(args: argparse.Namespace) -> None:
    if not (args.bundle or args.demo):
        raise ValueError("pass --bundle DIR (with --endpoint / --enclave for the protocol suite) or --demo")
    if args.demo and (args.endpoint or args.enclave or args.license_file or args.enclave_pid):
        raise ValueError("--demo starts its own services and license; drop --endpoint/--enclave/--license-file/"
                         "--enclave-pid")
    if args.bundle and not args.bundle.is_dir():
        raise FileNotFoundError(f"--bundle {args.bundle}: not a directory")
    if args.fuzz_requests is not None and args.fuzz_requests <= 0:
        raise ValueError("--fuzz-requests must be positive")
    if args.enclave_pid is not None:
        if not args.enclave:
            raise ValueError("--enclave-pid needs --enclave (the module that process serves)")
        try:
            os.kill(args.enclave_pid, 0)
        except ProcessLookupError:
            raise ValueError(f"--enclave-pid {args.enclave_pid}: no such process") from None
    select(args.suite, args.attack)  # unknown attack names fail here, before any work


def cmd_attack(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sealnet.attacks.report import run_attacks

    if args.list:
        list_attacks()
        return 0
    _validate(args)
    attacks = select(args.suite, args.attack)
    budget = BUDGETS[args.budget]
    if args.fuzz_requests:
        budget = replace(budget, fuzz_requests=args.fuzz_requests)
    started = time.perf_counter()
    if args.demo:
        from sealnet.attacks.demo_target import demo_target

        with demo_target(args.workdir, epochs=args.epochs, seed=args.seed, method=args.method) as target:
            report = run_attacks(target, attacks, budget, args.out, only_applicable=not args.attack)
    else:
        from sealnet.licenses import load_owner_key

        target = Target(
            args.bundle, endpoint=args.endpoint, enclave=args.enclave, enclave_tls=args.enclave_tls,
            data_dir=args.data_dir, seed=args.seed,
            license=_read_token(args.license_file, "--license-file"),
            owner_key=load_owner_key(args.owner_key) if args.owner_key else None,
            revoked_license=_read_token(args.revoked_license_file, "--revoked-license-file"),
            kill_enclave=_kill_pid(args.enclave_pid) if args.enclave_pid else None,
        )
        if any(a.suite == "protocol" for a in attacks):
            from sealnet.attacks.protocol import preflight

            preflight(target)
        report = run_attacks(target, attacks, budget, args.out, only_applicable=not args.attack)
    summary = report.summary()
    failed = [f"{r['attack']}/{r['metric']}" for r in summary if r["passed"] is False]
    print(f"\n{sum(r['passed'] is True for r in summary)} PASS, {len(failed)} FAIL"
          + (f" ({', '.join(failed)})" if failed else "")
          + f"; report in {args.out}/ (report.md, report.json, PNG plots); {time.perf_counter() - started:.0f} s")
    return 1 if report.failed else 0
