"""The `sealnet` command: one subcommand per user task."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from sealnet.data import add_data_arguments
from sealnet.errors import SealnetError, missing_extra
from sealnet.protect.user_args import add_model_arguments as add_user_model_arguments
from sealnet.rpc import default_enclave_address


def _read_license(args: argparse.Namespace) -> str | None:
    if getattr(args, "license_file", None):
        return Path(args.license_file).read_text().strip()
    return os.environ.get("SEALNET_LICENSE")


# -- protect / export ------------------------------------------------------------------------------------
def cmd_protect(args: argparse.Namespace) -> int:
    from sealnet.errors import InvalidArgument
    from sealnet.protect.methods import get_method

    method = get_method(args.method)
    if not method.own_model_flag and args.model and method.user_model_refusal:
        raise InvalidArgument(f"sealnet protect {method.name} --model: {method.user_model_refusal}")
    return method.protect(args)


def add_protect_parser(sub: argparse._SubParsersAction) -> None:
    """`sealnet protect METHOD`: the flags every method shares, then each method's own (its method file)."""
    from sealnet.protect.methods import METHODS

    protect = sub.add_parser("protect", help="train a protected model and write a checkpoint")
    methods = protect.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, method in METHODS.items():
        p = methods.add_parser(name, help=method.summary, description=method.summary)
        add_data_arguments(p)
        if not method.own_model_flag:
            add_user_model_arguments(p.add_argument_group("your own network (sealnet inspect --model lists "
                                                          "--split-at)"))
        p.add_argument("--epochs", type=int, default=8)
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--seed", type=int, default=0)
        if method.baseline_option:
            p.add_argument("--no-baseline", action="store_true", help="skip training the unprotected baseline")
        p.add_argument("--out", type=Path, default=Path("protected.pt"))
        method.add_arguments(p)
        p.set_defaults(func=cmd_protect)


def cmd_export(args: argparse.Namespace) -> int:
    from sealnet.export.build_engine import run

    return run(args)


# -- licenses and keystore -------------------------------------------------------------------------------
def cmd_license_keygen(args: argparse.Namespace) -> int:
    from sealnet.licenses import write_owner_key

    key, pub = write_owner_key(args.path, overwrite=args.force)
    print(f"owner signing key {key} (0600; keep it offline), public key {pub}")
    return 0


def cmd_license_issue(args: argparse.Namespace) -> int:
    from sealnet.licenses import issue_license, load_owner_key

    token = issue_license(load_owner_key(args.owner_key), customer_id=args.customer, model_id=args.model,
                          serial_number=args.serial, valid_seconds=int(args.days * 86400))
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"license for {args.customer} / {args.model} / SN {args.serial} written to {args.out}")
    else:
        print(token)
    return 0


def cmd_license_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sealnet.licenses import inspect_license, load_public_key, verify_license

    token = Path(args.token[1:]).read_text().strip() if args.token.startswith("@") else args.token
    lic = inspect_license(token)
    fields = asdict(lic)
    for name in ("issued_at", "not_before", "expires_at"):
        fields[name] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fields[name]))
    if args.owner_public_key:
        verify_license(token, load_public_key(args.owner_public_key), model_id=lic.model_id)
        fields["signature"] = "valid (owner key and expiry checked)"
    else:
        fields["signature"] = "not checked (pass --owner-public-key)"
    print(json.dumps(fields, indent=2))
    return 0


def cmd_keystore_init(args: argparse.Namespace) -> int:
    from sealnet.enclave_sim.keystore import init_keystore

    print(f"keystore root key {init_keystore(args.directory)} (0600)")
    return 0


# -- services --------------------------------------------------------------------------------------------
def exec_enclave(argv: list[str]) -> None:
    """Replace this process by the trusted module's own entry (`python -m sealnet.enclave_sim`), so that the
    module's process imports only its measured code (see enclave_sim/__main__.py for the interpreter flags)."""
    from sealnet.enclave_sim import default_state_dir

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--state-dir", type=Path)
    state_dir = parser.parse_known_args(argv)[0].state_dir  # the module itself parses (and checks) the rest
    pycache = (state_dir or default_state_dir()) / "pycache"
    pycache.mkdir(parents=True, exist_ok=True, mode=0o700)
    sys.stdout.flush()
    os.execv(sys.executable,
             [sys.executable, "-P", "-X", f"pycache_prefix={pycache}", "-m", "sealnet.enclave_sim", *argv])


def cmd_certs(args: argparse.Namespace) -> int:
    from sealnet.certs import write_certs

    written = write_certs(args.directory, hosts=tuple(args.host), clients=tuple(args.client), force=args.force)
    print("wrote " + ", ".join(p.name for p in written) + f" in {args.directory} (keys 0600)")
    return 0


def cmd_attest(args: argparse.Namespace) -> int:
    from sealnet.bundle import EXPECTED_MEASUREMENTS, load_bundle
    from sealnet.runtime.attestation import AttestationError, attest, load_expected
    from sealnet.runtime.enclave_client import EnclaveClient, EnclaveError

    path = args.expected or load_bundle(args.bundle).path(EXPECTED_MEASUREMENTS)
    expected = load_expected(path)
    client = EnclaveClient(args.address, tls_dir=args.tls_dir)
    try:
        resp = attest(client, expected)
    except (AttestationError, EnclaveError) as exc:
        print(f"attestation FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"attestation OK: {resp.format}, key {resp.attestation_public_key.hex()[:16]}... pinned, "
          f"chain {resp.chain.hex()[:16]}... over a fresh nonce")
    for m in resp.measurements:
        print(f"  {m.sha256.hex()[:16]}...  {m.name}  (matches)")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sealnet.enclave_sim.policy import AuditChainError, verify_audit_chain

    try:
        summary = verify_audit_chain(args.logs)
    except AuditChainError as exc:
        print(f"audit chain BROKEN: {exc}", file=sys.stderr)
        return 2
    start = "from the first record" if summary.from_genesis else "continuing an earlier file not given"
    print(f"audit chain intact: {summary.records} records in {len(args.logs)} file(s), {start}; head "
          f"{summary.head} (keep it elsewhere: a rewrite of the tail after it would change it)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sealnet.licenses import load_public_key
    from sealnet.rpc import stop_on_signals, wait_forever
    from sealnet.runtime.batching import BatchingConfig
    from sealnet.runtime.identity import TrustedProxies
    from sealnet.runtime.server import serve

    if args.engine == "triton":
        from sealnet.runtime.triton.cli import serve_triton

        return serve_triton(args, stop_on_signals())
    if args.onnx:
        from sealnet.runtime.server import serve_unprotected

        if args.bundle:
            raise ValueError("serve: pass either --bundle (protected) or --onnx (unprotected), not both")
        server, service = serve_unprotected(args.onnx, args.model_id or args.onnx.stem, args.listen,
                                            ort_threads=args.ort_threads)
        print(f"UNPROTECTED KServe v2 endpoint for {service.model_id} on {args.listen} (no trusted module, "
              "no license check)", flush=True)
        wait_forever(server, stop_on_signals())
        return 0
    if not args.bundle:
        raise ValueError("serve: --bundle is required (or --onnx for an unprotected model)")
    batching = None if args.no_batching else BatchingConfig(args.max_batch_size, args.max_queue_delay_ms,
                                                            args.batch_workers, args.max_queued_items)
    enclave = None if args.benchmark_bypass_trusted_module else args.enclave
    server, service = serve(args.bundle, args.listen, enclave, ort_threads=args.ort_threads,
                            enclave_tls=args.enclave_tls, expected_measurements=args.expected_measurements,
                            attest_timeout=args.attest_timeout, batching=batching,
                            providers=["auto"] if args.providers == "auto" else ["CPUExecutionProvider"],
                            owner_public_key=load_public_key(args.owner_public_key) if args.owner_public_key else None,
                            trusted_proxies=TrustedProxies(args.trusted_proxy or ()))
    providers = ",".join(service.pipeline.session.get_providers())
    print(f"KServe v2 endpoint for {service.model_id} on {args.listen} (trusted module {enclave}, {providers})",
          flush=True)
    wait_forever(server, stop_on_signals())
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    import grpc

    from sealnet.data import load_data_from_args
    from sealnet.runtime.client import InferenceClient

    if args.input:
        x, y = np.load(args.input).astype(np.float32), None
    else:
        data = load_data_from_args(args)
        x, y = data.x_test[: args.count], data.y_test[: args.count]
    client = InferenceClient(args.server, args.model)
    try:
        preds = np.concatenate([client.predict_labels(x[i : i + args.batch_size], _read_license(args))
                                for i in range(0, len(x), args.batch_size)])
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print("predictions:", " ".join(map(str, preds[:20])) + (" ..." if len(preds) > 20 else ""))
    if y is not None:
        print(f"accuracy on {len(y)} test images: {(preds == y).mean():.2%}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`sealnet verify`: a passport check, or with --trigger a serial-number watermark check."""
    if args.trigger is None:
        if (args.checkpoint is None and args.bundle is None) or args.signature is None:
            raise SystemExit("sealnet verify: give --checkpoint (or --bundle) and --signature (passport), or "
                             "--trigger with --onnx or --endpoint (serial-number watermark)")
        from sealnet.cli.passport import cmd_verify as cmd_verify_passport

        return cmd_verify_passport(args)
    from sealnet.cli.serial import cmd_verify_watermark

    return cmd_verify_watermark(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sealnet.demo import run_demo, run_demo_seeds

    if args.seeds < 1:
        raise SystemExit("sealnet demo: --seeds must be at least 1")
    from sealnet.protect.user_args import UserModelChoice

    kwargs = {"epochs": args.epochs, "json_path": args.json, "seed": args.seed, "keystore": args.keystore,
              "method": args.method, "engine": args.engine, "user": UserModelChoice.from_args(args)}
    if args.seeds > 1:
        return run_demo_seeds(args.workdir, args.seeds, **kwargs)
    return run_demo(args.workdir, **kwargs)


# -- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from sealnet.export import add_arguments as add_export_arguments
    from sealnet.protect.methods import with_demo

    parser = argparse.ArgumentParser(prog="sealnet", description="Deploy protected models behind a trusted module.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    add_protect_parser(sub)
    from sealnet.cli.passport import add_passport_eval_parser, add_verify_parser
    from sealnet.cli.sealed_head import add_backbone_parser, add_inspect_parser
    from sealnet.cli.serial import add_ca_parser, add_serial_eval_parser, add_verify_serial_arguments

    add_inspect_parser(sub)
    p = sub.add_parser("export", help="build a bundle: public ONNX, sealed secrets, signed manifest")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    lic = sub.add_parser("license", help="owner keys and licenses").add_subparsers(dest="license_cmd", required=True)
    p = lic.add_parser("keygen", help="create an owner Ed25519 signing key")
    p.add_argument("path", type=Path)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_license_keygen)
    p = lic.add_parser("issue", help="sign a license for a customer")
    p.add_argument("--owner-key", type=Path, required=True)
    p.add_argument("--customer", required=True)
    p.add_argument("--model", required=True, help="model id of the bundle (manifest.json: model_id)")
    p.add_argument("--serial", required=True, help="serial number bound to this license")
    p.add_argument("--days", type=float, default=365.0)
    p.add_argument("--out", type=Path, help="write the token to this file (0600) instead of stdout")
    p.set_defaults(func=cmd_license_issue)
    p = lic.add_parser("inspect", help="show a license's fields (TOKEN or @FILE)")
    p.add_argument("token")
    p.add_argument("--owner-public-key", type=Path, help="also verify the signature and expiry")
    p.set_defaults(func=cmd_license_inspect)

    ks = sub.add_parser("keystore", help="the trusted module's keystore").add_subparsers(dest="ks_cmd", required=True)
    p = ks.add_parser("init", help="create a keystore directory with a fresh root key")
    p.add_argument("directory", type=Path)
    p.set_defaults(func=cmd_keystore_init)

    # `sealnet enclave ARGS` execs `python -m sealnet.enclave_sim ARGS` (see main); listed here for --help.
    sub.add_parser("enclave", help="run the trusted module (gRPC); `sealnet enclave --help` lists its options")

    audit = sub.add_parser("audit", help="the trusted module's audit log").add_subparsers(dest="audit_cmd",
                                                                                          required=True)
    p = audit.add_parser("verify", help="check the hash chain of audit logs (exit 2 naming the first broken line)")
    p.add_argument("logs", type=Path, nargs="+", help="oldest first, e.g. audit.jsonl.2 audit.jsonl.1 audit.jsonl")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("certs", help="create a private CA and mTLS certificates for the services")
    p.add_argument("directory", type=Path)
    p.add_argument("--host", action="append", default=["localhost", "127.0.0.1", "::1"],
                   help="server certificate host name or IP (repeatable)")
    p.add_argument("--client", action="append", default=["runtime"], help="client certificate name (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("attest", help="challenge a trusted module and check it against expected measurements")
    p.add_argument("address", help="unix:PATH or HOST:PORT of the trusted module")
    p.add_argument("--bundle", type=Path, default=Path("bundle"), help="bundle whose expected measurements to use")
    p.add_argument("--expected", type=Path, help="expected-measurements.json (default: the bundle's)")
    p.add_argument("--tls-dir", type=Path, help="mTLS certificates, for a TCP address")
    p.set_defaults(func=cmd_attest)

    p = sub.add_parser("serve", help="run the KServe v2 inference endpoint")
    p.add_argument("--engine", choices=["python", "triton"], default="python",
                   help="python: sealnet's asyncio gRPC server (default); triton: NVIDIA Triton Inference Server "
                        "with the same pipeline in its Python backend (gRPC + HTTP + metrics)")
    p.add_argument("--bundle", type=Path, help="the bundle to serve through the trusted module")
    p.add_argument("--onnx", type=Path, help="instead: serve this bare ONNX model UNPROTECTED (what a pirate's "
                                             "deployment looks like; for `sealnet verify --endpoint` and experiments)")
    p.add_argument("--model-id", help="with --onnx: the model name clients use (default: the file's stem)")
    p.add_argument("--enclave", default=default_enclave_address(), help="trusted module address")
    p.add_argument("--listen", default="127.0.0.1:8001", help="HOST:PORT (default 127.0.0.1:8001) or unix:PATH")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--enclave-tls", type=Path, help="mTLS certificates for a TCP trusted module (sealnet certs)")
    p.add_argument("--expected-measurements", type=Path, help="default: the bundle's expected-measurements.json")
    p.add_argument("--attest-timeout", type=float, default=60.0, help="seconds to wait for the trusted module")
    p.add_argument("--max-batch-size", type=int, default=64, help="dynamic batching: items per merged run")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                   help="dynamic batching: longest wait for company (0: merge only what is already queued)")
    p.add_argument("--batch-workers", type=int, default=2, help="dynamic batching: merged batches in flight")
    p.add_argument("--max-queued-items", type=int, default=8192,
                   help="backpressure: items waiting at most; more is refused with RESOURCE_EXHAUSTED")
    p.add_argument("--owner-public-key", type=Path,
                   help="the owner's public key (from the owner, kept outside the bundle): refuse a bundle signed "
                        "by any other key")
    p.add_argument("--no-batching", action="store_true", help="serve each request on its own")
    p.add_argument("--providers", choices=["auto", "cpu"], default="auto",
                   help="auto: TensorRT / CUDA execution providers when present, else CPU")
    p.add_argument("--benchmark-bypass-trusted-module", action="store_true",
                   help="MEASUREMENT ONLY: run the public network on raw inputs (near-chance answers)")
    from sealnet.runtime.triton.cli import add_serve_triton_arguments, add_triton_repo_parser, add_triton_watch_parser

    add_serve_triton_arguments(p)
    p.set_defaults(func=cmd_serve)
    add_triton_repo_parser(sub, default_enclave_address())
    add_triton_watch_parser(sub)

    p = sub.add_parser("infer", help="query an endpoint with test images or a .npy batch")
    p.add_argument("--server", default="127.0.0.1:8001")
    p.add_argument("--model", required=True)
    p.add_argument("--license-file", type=Path, help="license token file (default: $SEALNET_LICENSE)")
    p.add_argument("--input", type=Path, help="float32 .npy batch shaped like the model input")
    add_data_arguments(p)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_infer)

    # `sealnet bench ARGS` is passed whole to bench/run.py (see main); listed here for --help.
    sub.add_parser("bench", help="serving benchmark: in-process ONNX Runtime, unprotected, protected, KServe")

    p = sub.add_parser("demo", help="train, export, serve and query end to end on the embedded data")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="run the demo N times (training seeds SEED..SEED+N-1, a fresh owner key each) and report "
                        "mean and min/max (WORKDIR/seed-i/)")
    p.add_argument("--json", type=Path, help="also write the result table as JSON")
    p.add_argument("--keystore", choices=["embedded", "tpm"], default="embedded",
                   help="tpm: seal to a software TPM (swtpm) started for the demo")
    p.add_argument("--method", choices=with_demo(), default="transform",
                   help="sealed-head: public backbone + sealed head, plus the stealing and insider measurements")
    p.add_argument("--engine", choices=["python", "triton"], default="python",
                   help="triton: serve on NVIDIA Triton Inference Server (./dev installs it)")
    user = p.add_argument_group("your own model and data (--method sealed-head; default: the embedded demo)")
    add_user_model_arguments(user)
    add_data_arguments(user, default=None)
    user.add_argument("--public-data", metavar="DATA", help="pretrain the public part on these public images only")
    user.add_argument("--public-epochs", type=int, default=8)
    user.add_argument("--head-epochs", type=int, default=20)
    user.add_argument("--max-drop", type=float, default=0.02,
                      help="refuse a head below baseline - this (default 0.02 = 2 pts)")
    p.set_defaults(func=cmd_demo)

    from sealnet.cli.attack import add_attack_parser

    add_attack_parser(sub)
    p = add_verify_parser(sub)
    add_verify_serial_arguments(p)
    p.set_defaults(func=cmd_verify)
    add_passport_eval_parser(sub)
    add_ca_parser(sub)
    add_serial_eval_parser(sub)
    add_backbone_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console entry. Errors end as `error: MESSAGE` on stderr and the exit code of sealnet/errors.py: a
    SealnetError its own, a plain OSError or ValueError 2, an optional dependency this install lacks 3
    (MissingExtra naming the extra, e.g. on an edge install without torch)."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = [a for a in argv[:1] if a in ("-v", "--verbose")]
    words = argv[len(verbose) :]
    if words[:1] == ["enclave"]:
        exec_enclave(words[1:] + verbose)
    command = f"sealnet {words[0]}" if words and not words[0].startswith("-") else "sealnet"
    try:
        try:
            if argv[:1] == ["bench"]:
                from sealnet.bench.run import main as bench_main

                return bench_main(argv[1:])
            args = build_parser().parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="%(asctime)s %(name)s %(levelname)s %(message)s")
            return args.func(args)
        except ModuleNotFoundError as exc:
            missing = missing_extra(exc, command)
            if missing is None:
                raise
            raise missing from None
    except SealnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:  # FileNotFoundError, FileExistsError, a malformed file...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
