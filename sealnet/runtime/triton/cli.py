"""`sealnet triton-repo` and `sealnet serve --engine triton`."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from pathlib import Path

from sealnet.runtime.identity import TrustedProxies
from sealnet.runtime.triton.protocol import DEFAULT_CLIENT_HEADER


def _add_repo_options(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Options shared by both commands (`serve` prefixes the Triton-only ones with --triton-)."""
    p.add_argument(f"--{prefix}network", choices=["inline", "bls", "ensemble"], default="inline",
                   help="inline: ONNX Runtime inside the protected model (default); ensemble: the public network "
                        "as its own model on Triton's onnxruntime / TensorRT backend (pick with tritonserver "
                        "--model-config-name onnxruntime|tensorrt; the pip tritonserver runs a Python stand-in) "
                        "and only the trusted module's step in Python, wired in a Triton ensemble; bls: the same "
                        "public model called from the protected model")
    p.add_argument(f"--{prefix}public-instances", type=int, default=1,
                   help="bls / ensemble: copies of the public model (instance_group count)")
    p.add_argument(f"--{prefix}accelerator", choices=["none", "tensorrt"], default="none",
                   help="the public model's onnxruntime config on a GPU host: tensorrt adds ONNX Runtime's "
                        "TensorRT execution provider (configs/tensorrt.pbtxt is the TensorRT backend itself)")
    p.add_argument(f"--{prefix}instances", type=int, default=1,
                   help="copies of the protected model (one Python-backend process each)")
    p.add_argument("--client-header", default=DEFAULT_CLIENT_HEADER,
                   help="forwarded header that names the end client for the lockout (set by a trusted proxy)")
    p.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   help="a proxy whose forwarded header names the end client (repeatable); without one the header "
                        "is ignored. Behind Triton, which cannot see the peer, it also states that Triton is "
                        "reachable only through these proxies")


def build_options(args: argparse.Namespace, *, network: str, instances: int, public_instances: int = 1,
                  accelerator: str = "none"):
    from sealnet.runtime.triton.repo import RepoOptions

    return RepoOptions(enclave=args.enclave, enclave_tls=args.enclave_tls, network=network,
                       max_batch_size=args.triton_max_batch_size,
                       max_queue_delay_us=int(round(args.max_queue_delay_ms * 1000)), instances=instances,
                       ort_threads=args.ort_threads, attest_timeout_s=args.attest_timeout,
                       client_header=args.client_header, providers=args.providers,
                       public_instances=public_instances, accelerator=accelerator,
                       trusted_proxies=tuple(map(str, TrustedProxies(args.trusted_proxy or ()).networks)))


def _owner(args: argparse.Namespace):
    from sealnet.licenses import load_public_key

    return load_public_key(args.owner_public_key) if args.owner_public_key else None


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from sealnet.runtime.triton.repo import write_repository

    dirs = write_repository(args.bundle, args.out, build_options(args, network=args.network,
                                                                 instances=args.instances,
                                                                 public_instances=args.public_instances,
                                                                 accelerator=args.accelerator), force=args.force,
                            expected_owner=_owner(args))
    print(f"Triton model repository {args.out}: " + ", ".join(d.name for d in dirs))
    print(f"serve it: tritonserver --model-repository {args.out} --model-control-mode=explicit --load-model='*' "
          "--strict-readiness=true --grpc-header-forward-pattern='^(sealnet-license|x-forwarded-for)$' "
          "--http-header-forward-pattern='^(sealnet-license|x-forwarded-for)$'")
    print(f"  and beside it: sealnet triton-watch --http HOST:8000 --repository {args.out}  (readiness follows the "
          "trusted module); or both at once: sealnet serve --engine triton")
    return 0


def cmd_triton_watch(args: argparse.Namespace) -> int:
    """Keep a running Triton's readiness true to its protected models' trusted modules, until a signal."""
    from sealnet.rpc import stop_on_signals
    from sealnet.runtime.triton.server import ReadinessWatch, TritonHttp, protected_models

    models = protected_models(args.repository)
    if not models:
        raise ValueError(f"--repository {args.repository}: no sealnet protected model (sealnet triton-repo writes one)")
    watch = ReadinessWatch(TritonHttp(args.http, args.load_timeout), models, interval=args.interval)
    watch.start()
    print(f"watching {', '.join(models)} on Triton {args.http}: unloaded while the trusted module is down, "
          "loaded again when it answers", flush=True)
    stop_on_signals().wait()
    watch.stop()
    return 0


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: --engine triton needs HOST:PORT")
    return host, int(port)


def serve_triton(args: argparse.Namespace, stop: threading.Event) -> int:
    """Write the repository (a temporary one unless --triton-repo), start tritonserver, serve until `stop`."""
    from sealnet.runtime.triton.repo import write_repository
    from sealnet.runtime.triton.server import TritonServer

    if args.onnx or args.benchmark_bypass_trusted_module or args.no_batching or args.expected_measurements:
        raise ValueError("--engine triton serves a bundle through its trusted module with the bundle's own expected "
                         "measurements; --onnx, --benchmark-bypass-trusted-module, --no-batching and "
                         "--expected-measurements are python-engine options")
    if not args.bundle:
        raise ValueError("serve: --bundle is required")
    host, grpc_port = _host_port(args.listen)
    work = Path(tempfile.mkdtemp(prefix="sealnet-triton-"))
    repo = args.triton_repo or work / "models"
    try:
        write_repository(args.bundle, repo, build_options(args, network=args.triton_network,
                                                          instances=args.triton_instances,
                                                          public_instances=args.triton_public_instances,
                                                          accelerator=args.triton_accelerator), force=True,
                         expected_owner=_owner(args))
        server = TritonServer(repo, host=host, grpc_port=grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, log_path=args.triton_log or work / "tritonserver.log",
                              log_verbose=args.triton_log_verbose, client_header=args.client_header,
                              extra_args=tuple(args.triton_arg or ()),
                              ready_timeout=args.attest_timeout + 120,
                              stub_timeout_s=int(args.attest_timeout) + 60)
        print(f"starting tritonserver on {repo} (log: {server.log_path})", flush=True)
        with server:
            print(f"Triton endpoints for {args.bundle}: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics "
                  f"{server.metrics_url} (trusted module {args.enclave}, attested)", flush=True)
            while not stop.wait(0.5):
                if server.process is None or server.process.poll() is not None:
                    print(f"tritonserver exited:\n{server.log_tail()}", flush=True)
                    return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def add_serve_triton_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--engine triton")
    g.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP/REST port (default 8000)")
    g.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port (default 8002)")
    g.add_argument("--triton-repo", type=Path, help="write the model repository here (default: a temporary one)")
    g.add_argument("--triton-log", type=Path, help="tritonserver's log file (default: in the temporary directory)")
    g.add_argument("--triton-log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    g.add_argument("--triton-max-batch-size", type=int,
                   help="Triton max_batch_size: largest request and merged batch (default: the bundle's max_batch)")
    g.add_argument("--triton-arg", action="append", metavar="ARG",
                   help="extra tritonserver argument, e.g. --triton-arg=--grpc-use-ssl=true (repeatable)")
    _add_repo_options(g, prefix="triton-")


def add_triton_watch_parser(sub) -> None:
    p = sub.add_parser("triton-watch", help="keep a running Triton's readiness true to its trusted modules")
    p.add_argument("--http", required=True, metavar="HOST:PORT", help="Triton's HTTP endpoint (repository API)")
    p.add_argument("--repository", type=Path, required=True, help="the model repository `sealnet triton-repo` wrote")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between checks of each trusted module")
    p.add_argument("--load-timeout", type=float, default=180.0, help="longest wait for one model load")
    p.set_defaults(func=cmd_triton_watch)


def add_triton_repo_parser(sub, default_enclave: str) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton model repository that serves a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--enclave", default=default_enclave, help="trusted module address (unix:PATH or "
                                                                        "HOST:PORT with --enclave-tls)")
    p.add_argument("--enclave-tls", type=Path, help="mTLS certificates for a TCP trusted module (sealnet certs)")
    p.add_argument("--attest-timeout", type=float, default=60.0, help="seconds to wait for the trusted module")
    p.add_argument("--triton-max-batch-size", type=int,
                   help="Triton max_batch_size (default: the bundle's max_batch)")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="dynamic batching: longest wait")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--providers", choices=["auto", "cpu"], default="auto",
                   help="auto: TensorRT / CUDA execution providers when present, else CPU")
    p.add_argument("--owner-public-key", type=Path, help="refuse a bundle not signed by this owner key")
    p.add_argument("--force", action="store_true", help="replace the bundle's model directories if present")
    _add_repo_options(p)
    p.set_defaults(func=cmd_triton_repo)
