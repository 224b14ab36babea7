"""`sealnet bench` (or `python bench/run.py`): what the trusted module and the gRPC hop cost.

In one run, on one model and machine, it measures throughput (items/s) and latency p50/p99 at several batch
sizes and client concurrencies for
  (a) limit:       ONNX Runtime in-process on public.onnx with pre-transformed inputs (one caller);
  (b) unprotected: the sealnet runtime with the trusted module bypassed (measurement-only switch);
  (c) protected:   the sealnet runtime with the trusted module on a Unix socket;
  (d) kserve:      KServe's Python model server (PyPI `kserve`, its own virtualenv) serving the same ONNX
                   model over the same v2 gRPC protocol;
  (e) triton:      the protected model on NVIDIA Triton Inference Server (`serve --engine triton`: Triton's C++
                   front-end and dynamic batcher, the same pipeline in its Python backend, the same module);
driving (b)-(e) with the same closed-loop client (bench/load.py) in its own process on the same loopback.
It also times one training epoch per protection method against plain training. Writes bench.json,
bench.md and bench.png into --out and prints the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sealnet.processes import free_port, sealnet_command, start_logged, stop_all

ROOT = Path(__file__).resolve().parents[2]  # the checkout: runs/ and the KServe virtualenv live here
KSERVE_VENV = ROOT / ".kserve-venv"
MODEL_ID = "bench-cnn-generator"
SEALED_HEAD_MODEL_ID = "bench-sealed-head"
TARGETS = {
    "protected_vs_unprotected_b64": (">=", 0.95),
    "protected_vs_limit_b64": (">=", 0.85),
    "protected_vs_kserve_b1_c16": (">=", 3.0),
    "triton_vs_kserve_b1_c16": (">=", 2.5),
    "triton_p99_vs_kserve_b1_c16": ("<=", 0.8),
    "triton_vs_kserve_b64_c4": (">=", 1.0),
    "triton_vs_limit_b64": (">=", 0.85),
}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# -- set-up ----------------------------------------------------------------------------------------------
def build_fixture(work: Path, epochs: int) -> dict[str, Any]:
    """A Generator-protected simple CNN on the embedded data, its bundle, a keystore and a license; under
    "sealed-head" the same for a sealed head behind the tap_cnn backbone (module after the network)."""
    from sealnet.data import mnist_embedded
    from sealnet.enclave_sim.keystore import init_keystore
    from sealnet.enclave_sim.keystore_spec import KeystoreSpec
    from sealnet.export.build_engine import build_bundle
    from sealnet.licenses import issue_license, load_owner_key, write_owner_key
    from sealnet.protect.backbones import make_public_backbone
    from sealnet.protect.checkpoint import save_checkpoint
    from sealnet.protect.pipeline import protect_transform
    from sealnet.protect.sealed_head import SealedHeadConfig, protect_sealed_head
    from sealnet.protect.train import TrainConfig

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _log(f"training the benchmark model ({epochs} epoch(s), Generator transform)")
    protect_transform(mnist_embedded(), "generator", work / "protected.pt", TrainConfig(epochs=epochs),
                      baseline=False)
    key, _ = write_owner_key(work / "owner.key")
    init_keystore(work / "keystore")
    # Timing only: a briefly trained (or untrained, --epochs 0) network may work on raw inputs or not at all,
    # so both accuracy gates are off.
    build_bundle(work / "protected.pt", work / "bundle", owner_key=key, keystore=KeystoreSpec("embedded",
                 work / "keystore"), model_id=MODEL_ID, max_raw_acc=1.0, min_authorized_acc=0.0,
                 log=lambda *_: None)
    token = issue_license(load_owner_key(key), customer_id="bench", model_id=MODEL_ID, serial_number="B-1",
                          valid_seconds=86400)
    (work / "license").write_text(token + "\n")
    fixture = {"bundle": work / "bundle", "keystore": work / "keystore", "license": work / "license"}
    _log(f"training the sealed-head benchmark model (seeded random public backbone, {epochs}-epoch teacher)")
    sealed = work / "sealed-head"
    sealed.mkdir()
    weights = make_public_backbone("tap_cnn", 0, sealed / "backbone.pt", kind="random")
    # Timing only, as above: the head's accuracy is not judged here (max_drop=1).
    ckpt = protect_sealed_head(mnist_embedded(), weights, "tap_cnn",
                               SealedHeadConfig(teacher_epochs=epochs, epochs=max(epochs, 1), max_drop=1.0),
                               progress=False, log=lambda *_: None)
    save_checkpoint(ckpt, sealed / "protected.pt")
    build_bundle(sealed / "protected.pt", sealed / "bundle", owner_key=key, keystore=KeystoreSpec("embedded",
                 work / "keystore"), model_id=SEALED_HEAD_MODEL_ID, min_authorized_acc=0.0, log=lambda *_: None)
    token = issue_license(load_owner_key(key), customer_id="bench", model_id=SEALED_HEAD_MODEL_ID,
                          serial_number="B-2", valid_seconds=86400)
    (sealed / "license").write_text(token + "\n")
    fixture["sealed-head"] = {"bundle": sealed / "bundle", "keystore": work / "keystore",
                              "license": sealed / "license", "model_id": SEALED_HEAD_MODEL_ID}
    return fixture


def ensure_kserve() -> str | None:
    """Create .kserve-venv with kserve + onnxruntime on first use; None if ready, else the reason not."""
    python = KSERVE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import kserve, onnxruntime"],
                                          capture_output=True).returncode == 0:
        return None
    _log("installing KServe into .kserve-venv (first run only; it pins an older protobuf than sealnet)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "kserve", "onnxruntime", "numpy"], check=True,
                       capture_output=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"could not install kserve: {exc}"
    return None


# -- measurements ----------------------------------------------------------------------------------------
def _load(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "sealnet.bench.load", *args], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-500:]}")
    return json.loads(out.stdout)


def measure_limit(onnx_path: Path, batches: list[int], duration: float, warmup: float) -> list[dict[str, Any]]:
    """(a): back-to-back ONNX Runtime calls in a fresh process, the same session options as the runtime."""
    rows = []
    for batch in batches:
        row = {"system": "limit", **_load(["--onnx", str(onnx_path), "--batch", str(batch), "--duration",
                                          str(duration), "--warmup", str(warmup)])}
        rows.append(row)
        _log(f"limit       b{batch:<3} c1   {row['items_per_s']:8.0f} items/s  p50 {row['p50_ms']:.2f} ms  "
             f"p99 {row['p99_ms']:.2f} ms")
    return rows


def _wait_ready(target: str, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    import grpc

    from sealnet._grpc import inference_pb2, inference_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a server exited during start-up; see the logs in the bench work directory")
            try:
                if stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server at {target} not ready after {timeout:.0f} s")
    finally:
        channel.close()


@contextlib.contextmanager
def _serving(system: str, fixture: dict[str, Any], work: Path, triton_network: str,
             label: str) -> Iterator[tuple[str, str | None]]:
    """Serve `fixture`'s bundle as `system`: (the endpoint's HOST:PORT, Triton's metrics URL or None). The
    protected systems are a LocalDeployment (trusted module + endpoint as processes, logs in WORK/LABEL/logs);
    the unprotected runtime and the KServe server are one process each."""
    if system in ("protected", "triton"):
        from sealnet.deployment import LocalDeployment
        from sealnet.enclave_sim.keystore_spec import KeystoreSpec

        with LocalDeployment(fixture["bundle"], keystore=KeystoreSpec("embedded", fixture["keystore"]),
                             workdir=work / label, processes=True, engine="python" if system == "protected" else
                             "triton", triton_network=triton_network, ready_timeout=90) as d:
            yield d.endpoint, d.metrics_url
        return
    port = free_port()
    target = f"127.0.0.1:{port}"
    if system == "unprotected":
        cmd = sealnet_command("serve", "--bundle", str(fixture["bundle"]), "--listen", target,
                              "--benchmark-bypass-trusted-module")
        log = work / "runtime-unprotected.log"
    elif system == "kserve":
        cmd = [str(KSERVE_VENV / "bin" / "python"), str(Path(__file__).with_name("kserve_server.py")), "--onnx",
               str(fixture["bundle"] / "public.onnx"), "--model", MODEL_ID, "--grpc-port", str(port),
               "--http-port", str(free_port())]
        log = work / "kserve.log"
    else:
        raise ValueError(system)
    procs = [start_logged(cmd, log)]
    try:
        _wait_ready(target, procs)
        yield target, None
    finally:
        stop_all(procs)


def measure_server(system: str, fixture: dict[str, Any], work: Path, batches: list[int], concurrency: list[int],
                   duration: float, warmup: float, triton_network: str = "inline",
                   label: str | None = None) -> list[dict[str, Any]]:
    """Serve `fixture`'s bundle as `system` and drive it; rows are named `label` (default: the system)."""
    label = label or system
    license_args = ["--license-file", str(fixture["license"])] if system in ("protected", "triton") else []
    rows = []
    with _serving(system, fixture, work, triton_network, label) as (target, metrics_url):
        for batch in batches:
            for conc in concurrency:
                before = _triton_counters(metrics_url) if metrics_url else None
                row = {"system": label, **_load(["--target", target, "--model", fixture.get("model_id", MODEL_ID),
                                                 "--batch", str(batch), "--concurrency", str(conc), "--duration",
                                                 str(duration), "--warmup", str(warmup), *license_args])}
                if before is not None:
                    row["triton_breakdown"] = _breakdown(before, _triton_counters(metrics_url))
                rows.append(row)
                _log(f"{label:<11} b{batch:<3} c{conc:<3} {row['items_per_s']:8.0f} items/s  "
                     f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  errors {row['errors']}")
    return rows


def _triton_counters(metrics_url: str) -> dict[str, float]:
    """Triton's cumulative per-model counters and sealnet's trusted-module histogram sums, from one scrape."""
    import re
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        model = re.search(r'model="([^"]+)"', labels)
        if model is None or model.group(1) not in (MODEL_ID, *(MODEL_ID + s for s in _PARTS)):
            continue
        if name.startswith("nv_inference_") or name.startswith("sealnet_trusted_module_rpc_duration_us_"):
            rpc = re.search(r'rpc="(\w+)"', labels)
            part = model.group(1).removeprefix(MODEL_ID)  # "" (the protected model or the ensemble), or a step
            out[part + name + (f"/{rpc.group(1)}" if rpc else "")] = float(value)
    return out


_PARTS = ("-module", "-public")  # an ensemble's steps (sealnet/runtime/triton/repo.py)


def _breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Where one configuration's time went inside Triton: per request (queue, input, backend execute, output),
    items per backend execution (the batches the dynamic batcher formed), and the trusted-module RPC mean."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests, executions = delta("nv_inference_request_success"), delta("nv_inference_exec_count")
    calls = delta("sealnet_trusted_module_rpc_duration_us_count/Preprocess")
    per_request = {k: delta(f"nv_inference_{k}_duration_us") / requests if requests else None
                   for k in ("queue", "compute_input", "compute_infer", "compute_output", "request")}
    if not calls:  # an ensemble: the module step is its own model
        calls = delta("-modulesealnet_trusted_module_rpc_duration_us_count/Preprocess")
        module_sum = delta("-modulesealnet_trusted_module_rpc_duration_us_sum/Preprocess")
    else:
        module_sum = delta("sealnet_trusted_module_rpc_duration_us_sum/Preprocess")
    steps = {}
    for part in _PARTS:  # per request of the ensemble: each step's backend execute time, and its batches
        runs = delta(f"{part}nv_inference_exec_count")
        if runs:
            steps[f"{part[1:]}_execute_us_per_request"] = delta(f"{part}nv_inference_compute_infer_duration_us") \
                / max(requests, 1)
            steps[f"{part[1:]}_items_per_execution"] = delta(f"{part}nv_inference_count") / runs
    return {**{f"{k}_us_per_request": v for k, v in per_request.items()},
            "items_per_execution": delta("nv_inference_count") / executions if executions else None,
            "module_preprocess_us_per_call": module_sum / calls if calls else None, **steps}


def _breakdown_row(result: dict[str, Any], keys: tuple[str, ...]) -> str:
    """One Markdown row of a Triton profile table: batch, clients, then `keys` of its breakdown (n/a: absent)."""
    cells = [result["triton_breakdown"].get(k) for k in keys]
    return (f"| {result['batch']} | {result['concurrency']} | "
            + " | ".join("n/a" if c is None else f"{c:.0f}" for c in cells) + " |")


def measure_training(epochs: int = 1) -> dict[str, float]:
    """Seconds per epoch of plain training and of each protection method on the embedded data."""
    from sealnet.data import mnist_embedded
    from sealnet.protect.models import create_model
    from sealnet.protect.train import TrainConfig, seed_everything, train_plain, train_transform
    from sealnet.protect.transform import create_transform

    data = mnist_embedded()
    cfg = TrainConfig(epochs=epochs, progress=False)
    seed_everything(0)
    out = {"plain": train_plain(create_model("simple_cnn", data.input_shape, 10), data, cfg)}
    for variant in ("fixed", "learned", "generator"):
        seed_everything(0)
        out[f"transform/{variant}"] = train_transform(create_model("simple_cnn", data.input_shape, 10),
                                                      create_transform(variant, data.input_shape), data, cfg)
    for name, seconds in out.items():
        _log(f"training  {name:<20} {seconds:.2f} s/epoch  ({seconds / out['plain']:.2f}x plain)")
    return out


# -- report ----------------------------------------------------------------------------------------------
def _find(rows, system, batch, conc):
    return next((r for r in rows if r["system"] == system and r["batch"] == batch and r["concurrency"] == conc),
                None)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def ratio(num, den):
        return num["items_per_s"] / den["items_per_s"] if num and den and den["items_per_s"] else None

    c64, b64, a64 = _find(rows, "protected", 64, 4), _find(rows, "unprotected", 64, 4), _find(rows, "limit", 64, 1)
    c1_16, d1_16 = _find(rows, "protected", 1, 16), _find(rows, "kserve", 1, 16)
    e1_16, e64, d64 = _find(rows, "triton", 1, 16), _find(rows, "triton", 64, 4), _find(rows, "kserve", 64, 4)
    a1, c1 = _find(rows, "limit", 1, 1), _find(rows, "protected", 1, 1)
    h64, h1 = _find(rows, "sealed-head", 64, 4), _find(rows, "sealed-head", 1, 1)
    s = {
        "protected_vs_unprotected_b64": ratio(c64, b64),
        "protected_vs_limit_b64": ratio(c64, a64),
        "protected_vs_kserve_b1_c16": ratio(c1_16, d1_16),
        "triton_vs_kserve_b1_c16": ratio(e1_16, d1_16),
        "triton_p99_vs_kserve_b1_c16": e1_16["p99_ms"] / d1_16["p99_ms"] if e1_16 and d1_16 and d1_16["p99_ms"]
        else None,
        "triton_vs_kserve_b64_c4": ratio(e64, d64),
        "triton_vs_limit_b64": ratio(e64, a64),
        "p99_ms_b1_c16_triton": e1_16 and e1_16["p99_ms"],
        "p99_ms_b1_c16_protected": c1_16 and c1_16["p99_ms"],
        "p99_ms_b1_c16_kserve": d1_16 and d1_16["p99_ms"],
        "p99_ms_b1_limit": a1 and a1["p99_ms"],
        "p99_ms_b1_protected": c1 and c1["p99_ms"],
        "sealed_head_items_per_s_b64_c4": h64 and h64["items_per_s"],
        "p99_ms_b1_sealed_head": h1 and h1["p99_ms"],
    }
    checks = {k: _meets(v, *TARGETS[k]) for k, v in s.items() if k in TARGETS}
    if s["p99_ms_b1_c16_protected"] is not None and s["p99_ms_b1_c16_kserve"] is not None:
        checks["p99_b1_c16_protected_le_kserve"] = s["p99_ms_b1_c16_protected"] <= s["p99_ms_b1_c16_kserve"]
    s["targets_met"] = checks
    return s


def _meets(value: float | None, op: str, target: float) -> bool:
    return value is not None and (value >= target if op == ">=" else value <= target)


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    lines = ["# sealnet serving benchmark", "", f"Machine: {report['machine']}. Rerun: `{report['command']}`.", "",
             "| ratio / latency | value | target | met |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        v = s[key]
        lines.append(f"| {key} | {'n/a' if v is None else f'{v:.2f}'} | {op} {target} | {s['targets_met'].get(key)} |")
    for key in ("p99_ms_b1_c16_protected", "p99_ms_b1_c16_kserve", "p99_ms_b1_c16_triton", "p99_ms_b1_limit",
                "p99_ms_b1_protected", "p99_ms_b1_sealed_head"):
        v = s[key]
        lines.append(f"| {key} | {'n/a' if v is None else f'{v:.2f} ms'} | | |")
    lines += ["", "b64 ratios at concurrency 4; the limit (a) is one in-process caller.", "",
              "| system | batch | concurrency | items/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['system']} | {r['batch']} | {r['concurrency']} | {r['items_per_s']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    breakdown = [r for r in report["results"] if r.get("triton_breakdown")]
    if breakdown:
        lines += ["", "Inside Triton (e), per request, from its metrics (µs): queue / input / backend execute / "
                  "output, items per backend execution, trusted-module Preprocess per call.", "",
                  "| batch | clients | queue | input | execute | output | items/exec | module |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_breakdown_row(r, ("queue_us_per_request", "compute_input_us_per_request",
                                     "compute_infer_us_per_request", "compute_output_us_per_request",
                                     "items_per_execution", "module_preprocess_us_per_call")) for r in breakdown]
        steps = [r for r in breakdown if "public_items_per_execution" in r["triton_breakdown"]]
        if steps:
            lines += ["", "The ensemble's steps, per ensemble request (µs of backend execute) and the batches each "
                      "step's dynamic batcher formed:", "",
                      "| batch | clients | module step | its items/exec | public model | its items/exec |",
                      "|---|---|---|---|---|---|"]
            lines += [_breakdown_row(r, ("module_execute_us_per_request", "module_items_per_execution",
                                         "public_execute_us_per_request", "public_items_per_execution"))
                      for r in steps]
    if report.get("training_s_per_epoch"):
        plain = report["training_s_per_epoch"]["plain"]
        lines += ["", "| training | s/epoch | x plain |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {v / plain:.2f} |" for k, v in report["training_s_per_epoch"].items()]
    for note in report.get("notes", []):
        lines += ["", note]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    _plot(out / "bench.png", report["results"])


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in ("limit", "unprotected", "protected", "kserve", "triton", "sealed-head")
               if any(r["system"] == s for r in rows)]
    configs = sorted({(r["batch"], r["concurrency"]) for r in rows if r["system"] != "limit"})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs, tput, p99 = [], [], []
        for j, (b, c) in enumerate(configs):
            r = _find(rows, system, b, c) or (_find(rows, system, b, 1) if system == "limit" else None)
            if r:
                xs.append(j + i * width)
                tput.append(r["items_per_s"])
                p99.append(r["p99_ms"])
        axes[0].bar(xs, tput, width, label=system)
        axes[1].bar(xs, p99, width, label=system)
    for ax, title in zip(axes, ("throughput (items/s, log)", "p99 latency (ms, log)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], [f"b{b}\nc{c}" for b, c in configs])
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sealnet bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per configuration")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the benchmark model")
    p.add_argument("--skip-kserve", action="store_true")
    p.add_argument("--skip-triton", action="store_true", help="skip the protected model on Triton (e)")
    p.add_argument("--triton-network", choices=["inline", "bls", "ensemble"], default="ensemble",
                   help="(e): public network inside the protected model, as its own model called through BLS, or "
                        "in a Triton ensemble beside the module step")
    p.add_argument("--skip-training", action="store_true", help="skip the training-cost measurement")
    p.add_argument("--json", type=Path, help="also write the summary + results JSON here")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    work = args.out / "work"
    started = time.perf_counter()
    fixture = build_fixture(work, args.epochs)
    notes = []
    rows = measure_limit(fixture["bundle"] / "public.onnx", batches, args.duration, args.warmup)
    systems = ["unprotected", "protected"]
    if args.skip_kserve:
        notes.append("KServe (d) skipped (--skip-kserve).")
    elif reason := ensure_kserve():
        notes.append(f"KServe (d) not measured: {reason}")
    else:
        systems.append("kserve")
    if args.skip_triton:
        notes.append("Triton (e) skipped (--skip-triton).")
    else:
        from sealnet.runtime.triton.server import triton_unavailable_reason

        if reason := triton_unavailable_reason():
            notes.append(f"Triton (e) not measured: {reason}")
        else:
            systems.append("triton")
            notes.append(f"Triton (e): public network {args.triton_network} (--triton-network).")
    for system in systems:
        rows += measure_server(system, fixture, work, batches, concurrency, args.duration, args.warmup,
                               args.triton_network)
    rows += measure_server("protected", fixture["sealed-head"], work, batches, concurrency, args.duration,
                           args.warmup, label="sealed-head")
    notes.append("sealed-head: the protected python engine serving a sealed-head bundle (tap_cnn backbone on the "
                 "edge, the head in the trusted module after it).")
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": "sealnet bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": rows,
        "summary": summarise(rows),
        "training_s_per_epoch": None if args.skip_training else measure_training(),
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report["summary"], "results": rows}, indent=2) + "\n")
    s = report["summary"]
    for key, (op, target) in TARGETS.items():
        v = s[key]
        print(f"{key:<32} {'n/a' if v is None else f'{v:.2f}':>8}  (target {op} {target})")
    print(f"p99 b1 c16: protected {s['p99_ms_b1_c16_protected']} ms, triton {s['p99_ms_b1_c16_triton']} ms, "
          f"kserve {s['p99_ms_b1_c16_kserve']} ms; "
          f"report in {args.out}/bench.md ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
