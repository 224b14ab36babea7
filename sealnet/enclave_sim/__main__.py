"""`python -m sealnet.enclave_sim` (what `sealnet enclave` execs): the trusted module's process.

Its own entry so that the process imports only trusted-module code: everything it may import is measured
(enclave_sim/measure.py computes that set from this file's import closure), and nothing from the runtime, the
training code or the other CLIs is loaded. `sealnet enclave` starts it as
`python -P -X pycache_prefix=STATE_DIR/pycache -m sealnet.enclave_sim ...`: -P keeps the working directory off
sys.path, and the private pycache_prefix makes it compile the measured sources itself instead of loading
bytecode caches (which the measurement does not cover) from next to them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from sealnet.enclave_sim import default_state_dir
from sealnet.enclave_sim.keystore_spec import add_keystore_arguments, keystore_spec
from sealnet.enclave_sim.policy import PolicyConfig
from sealnet.enclave_sim.service import EnclaveOptions, serve
from sealnet.errors import SealnetError
from sealnet.rpc import default_enclave_address, stop_on_signals, wait_forever


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sealnet enclave`."""
    p.add_argument("--bundle", type=Path, required=True)
    add_keystore_arguments(p)
    p.add_argument("--listen", default=default_enclave_address(), help="unix:PATH (default) or HOST:PORT (mTLS)")
    p.add_argument("--tls-dir", type=Path, help="mTLS certificates (sealnet certs); required for TCP")
    p.add_argument("--state-dir", type=Path, help="lockout and quota state (default ~/.local/state/sealnet/enclave)")
    p.add_argument("--revocations", type=Path, help="file of revoked license ids / serial numbers, one per line")
    p.add_argument("--audit-log", type=Path, help="append hash-chained JSON-lines audit records here (SIGHUP "
                                                  "reopens it after an external rotation)")
    p.add_argument("--audit-max-mb", type=float, default=64.0, help="rotate the audit log past this size (0: never)")
    p.add_argument("--audit-keep", type=int, default=10, help="rotated audit files kept (LOG.1 .. LOG.N)")
    p.add_argument("--forwarder", action="append", default=["runtime"],
                   help="another mTLS certificate name (besides runtime) trusted to name its end clients for the "
                        "lockout (repeatable; Unix-socket callers always are)")
    p.add_argument("--max-failures", type=int, default=10,
                   help="failed license checks per client, and per license, per window")
    p.add_argument("--lockout-window", type=float, default=60.0, help="lockout window in seconds")
    p.add_argument("--max-bad-attempts", type=int, default=600,
                   help="failed license checks of all clients together per window; past it every bad attempt is "
                        "refused at once (a license the owner signed never is)")
    p.add_argument("--quota-items", type=int, default=0, help="items per license per quota window (0: unlimited)")
    p.add_argument("--quota-window", type=float, default=3600.0, help="quota window in seconds")
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads")
    p.add_argument("--report-modules", type=Path,
                   help="on exit, write the file of every module this process loaded (JSON), to check that the "
                        "measurement covers them")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def loaded_module_files() -> list[str]:
    """The source or extension file of every module loaded in this process."""
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    return sorted(str(Path(f).resolve()) for f in files if f)


def run(args: argparse.Namespace) -> int:
    options = EnclaveOptions(
        state_dir=args.state_dir or default_state_dir(), revocations=args.revocations, audit_log=args.audit_log,
        tls_dir=args.tls_dir, workers=args.workers, forwarders=tuple(args.forwarder),
        audit_max_bytes=int(args.audit_max_mb * (1 << 20)), audit_keep=args.audit_keep,
        policy=PolicyConfig(max_failures=args.max_failures, window_s=args.lockout_window,
                            max_bad_attempts=args.max_bad_attempts, quota_items=args.quota_items,
                            quota_window_s=args.quota_window),
    )
    server, module = serve(args.bundle, args.listen, keystore_spec(args), options)
    signal.signal(signal.SIGHUP, lambda *_: module.audit.reopen())  # after logrotate renamed the audit log
    print(f"trusted module serving {module.model_id} on {args.listen} ({module.keystore_backend} keystore, "
          f"chain {module.chain.hex()[:16]}...)", flush=True)
    try:
        wait_forever(server, stop_on_signals())
    finally:
        module.close()
        if args.report_modules:
            args.report_modules.write_text(json.dumps(loaded_module_files(), indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sealnet enclave", description="run the trusted module (gRPC)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(args)
    except SealnetError as exc:  # a keystore, bundle or license problem: exit codes as sealnet/errors.py says
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
