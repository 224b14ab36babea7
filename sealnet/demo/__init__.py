"""`sealnet demo`: the whole data path on the embedded data, from nothing, in a few minutes.

owner: train baseline + protected model, keygen, license -> integrator: keystore, export -> edge: trusted module
+ KServe endpoint as child processes -> client queries; pirate runs public.onnx. `--method transform` (default)
protects with the Generator transform; `--method sealed-head` puts a sealed head behind a public backbone and
also measures stealing and the insider against black-box access (TEESlice protocol).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from sealnet.attacks.direct_piracy import direct_piracy_accuracy
from sealnet.bundle import PARAMS
from sealnet.data import mnist_embedded
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim.service import EnclaveOptions
from sealnet.errors import InvalidArgument
from sealnet.protect.methods import DemoPlan, get_method, with_demo
from sealnet.protect.user_args import UserModelChoice
from sealnet.runtime.client import InferenceClient
from sealnet.runtime.triton.protocol import sealnet_status


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _print_table(title: str, column: str, rows: list[tuple[str, str]], rule: int) -> None:
    """Two aligned columns under a title (`rule` dashes under the second): what each demo run, and the summary
    over seeds, prints."""
    width = max(len(title), *(len(name) for name, _ in rows))
    print(f"\n{title:<{width}}  {column}\n{'-' * width}  {'-' * rule}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _write_json(path: Path | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def _query(
    client: InferenceClient, x: np.ndarray, token: str | None, batch: int = 100
) -> tuple[np.ndarray | None, str]:
    """Predictions and 'OK', or (None, status name) when the server refuses; behind Triton, whose codes lack
    sealnet's, the status is the first word of the message."""
    try:
        preds = [client.predict_labels(x[i : i + batch], token) for i in range(0, len(x), batch)]
    except grpc.RpcError as exc:
        return None, sealnet_status(exc.details() or "") or exc.code().name
    return np.concatenate(preds), "OK"


def run_demo(workdir: Path, *, epochs: int = 8, json_path: Path | None = None, seed: int = 0,
             keystore: str = "embedded", method: str = "transform", engine: str = "python",
             user: UserModelChoice | None = None) -> int:
    """The demo on the embedded data, or with `user` on the user's own model and data."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the services the demo started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if keystore == "tpm":
        from sealnet.enclave_sim.swtpm import swtpm_unavailable

        if reason := swtpm_unavailable():
            print(f"error: --keystore tpm needs a software TPM: {reason}", file=sys.stderr)
            return 2
    return _run(workdir, keystore, epochs=epochs, json_path=json_path, seed=seed, method=method, engine=engine,
                user=user)


def run_demo_seeds(workdir: Path, seeds: int, *, seed: int = 0, json_path: Path | None = None,
                   **kwargs) -> int:
    """The demo `seeds` times (training seeds SEED, SEED+1, ...; a fresh owner key and keystore each run), then
    mean and min/max of every number: one training run is an anecdote. 0 only if every run succeeded."""
    from sealnet.evaluate.multiseed import flatten, spread, summarize

    workdir = Path(workdir)
    codes, runs = [], []
    for i in range(seeds):
        _step(f"run {i + 1}/{seeds}: training seed {seed + i}")
        run_json = workdir / f"seed-{i}" / "demo.json"
        codes.append(run_demo(workdir / f"seed-{i}", seed=seed + i, json_path=run_json, **kwargs))
        if run_json.exists():
            runs.append(json.loads(run_json.read_text()))
    summary = summarize([flatten(r) for r in runs])
    report = {"seeds": seeds, "first_seed": seed, "runs_succeeded": codes.count(0), "summary": summary,
              "runs": runs}
    title = f"sealnet demo over {seeds} seeds"
    rows = [(label, spread(summary[k], percent=k.endswith("_acc"), digits=0 if k == "seconds" else 3))
            for k, label in SEED_ROWS if k in summary]
    _print_table(title, "mean [min, max]", rows, rule=24)
    print(f"{codes.count(0)}/{seeds} runs succeeded; one run per {workdir}/seed-i/")
    _write_json(json_path, report)
    return 0 if codes and all(c == 0 for c in codes) else 1


# The numbers `run_demo_seeds` summarises (when a run reports them), in table order.
SEED_ROWS = (("baseline_acc", "baseline (unprotected CNN, torch)"),
             ("authorized_acc", "authorized: gRPC + license + trusted module"),
             ("pirate_raw_acc", "pirate: public.onnx on raw inputs"),
             ("stealing_ratio_1pct", "thief with 1% of the labels / black-box"),
             ("stealing_ratio_10pct", "thief with 10% of the labels / black-box"),
             ("insider_ratio", "insider (module queries) / black-box"), ("seconds", "seconds"))


def demo_plan(method: str) -> DemoPlan:
    """The method's demo plan; a clear error for a method without one."""
    plan = get_method(method).demo()
    if plan is None:
        raise ValueError(f"sealnet demo: method {method!r} has no demo (demos: {', '.join(with_demo())})")
    return plan


def _stealing(bundle: Path, server_addr: str, enclave_addr: str, token: str, seed: int) -> dict:
    """TEESlice protocol against the running deployment: thief and insider, each relative to black-box."""
    from sealnet.attacks.base import BUDGETS, Target
    from sealnet.attacks.teeslice import insider_imitation, teeslice_stealing

    target = Target(bundle, endpoint=server_addr, enclave=enclave_addr, license=token, seed=seed)
    out = bundle.parent / "report"
    out.mkdir(exist_ok=True)
    steal = teeslice_stealing(target, BUDGETS["small"], out).details["rows"]
    insider = insider_imitation(target, BUDGETS["small"], out)
    by_fraction = {round(r["fraction"], 4): r for r in steal}
    return {"stealing_ratio_1pct": by_fraction[0.01]["ratio"], "stealing_ratio_10pct": by_fraction[0.1]["ratio"],
            "stealing": steal, "insider_ratio": next(m.value for m in insider.metrics if m.name == "insider_ratio"),
            "insider": insider.details}


def _run(workdir: Path, keystore: str, *, epochs: int, json_path: Path | None, seed: int, method: str,
         engine: str = "python", user: UserModelChoice | None = None) -> int:
    started = time.perf_counter()
    plan = demo_plan(method)
    if user is None:
        _step(plan.story)
        data = mnist_embedded(seed=0)
        ckpt = plan.train(data, workdir, epochs, seed)
        model_id = plan.model_id
    else:
        if plan.train_user is None:
            users = [m for m in with_demo() if demo_plan(m).train_user is not None]
            raise InvalidArgument(f"sealnet demo --model: method {method!r} does not take your own model "
                                  f"(methods that do: {', '.join(users)})")
        _step(f"owner: your model {user.model} on {user.dataset}: the baseline (whole network fine-tuned) and "
              "the sealed head (everything after the split, on the frozen public part's features)")
        data, ckpt = plan.train_user(user, workdir, epochs, seed)
        model_id = None  # the checkpoint's default: <model>-sealed-head
    metrics = ckpt.metrics
    extra: dict = {}
    with contextlib.ExitStack() as stack:
        _step(f"integrator: set up the trusted module's keystore ({keystore}) and export the bundle")
        deployment = LocalDeployment.export(
            workdir / "protected.pt", workdir, keystore=keystore, model_id=model_id, log=print, processes=True,
            engine=engine, enclave_options=EnclaveOptions(audit_log=workdir / "logs" / "audit.jsonl"),
            # on Triton the public network is its own model in an ensemble, except where the module's passport
            # parameters change its weights per session
            triton_network="inline" if get_method(method).module_step == PARAMS else "ensemble")
        stack.callback(deployment.stop)
        manifest = deployment.manifest
        model_id = deployment.model_id
        license_ok = deployment.license("acme", "SN-0001")
        license_other = deployment.license("acme", "SN-0002", model_id="another-model")
        _step("edge host: start the trusted module (Unix socket) and the KServe v2 endpoint (loopback TCP)")
        d = deployment.start()
        print(f"ready: {d.endpoint} -> {d.enclave}")
        _step("edge client: query the test split over gRPC")
        preds, status_ok = _query(d.client, data.x_test, license_ok)
        _, status_none = _query(d.client, data.x_test[:8], None)
        _, status_other = _query(d.client, data.x_test[:8], license_other)
        if engine == "triton":
            from sealnet.runtime.triton.probe import ensemble_steps, http_infer, metric_families

            triton = {"http_status": http_infer(d.http_address, model_id, data.x_test[:8], license_ok)[0],
                      "metrics": metric_families(d.metrics_url),
                      "triton_ensemble": ensemble_steps(d.http_address, model_id)}
        if plan.stealing:
            _step("thief and insider against black-box access (TEESlice protocol; trains small copies)")
            extra = _stealing(d.bundle, d.endpoint, d.enclave, license_ok, seed)

    _step("pirate: run the copied public.onnx on raw inputs")
    pirate = direct_piracy_accuracy(workdir / "bundle", data.x_test, data.y_test)

    authorized = float((preds == data.y_test).mean()) if preds is not None else float("nan")
    result = {
        "method": method,
        "baseline_acc": metrics["baseline_acc"],
        "authorized_acc": authorized,
        "authorized_torch_acc": metrics["authorized_acc"],
        "pirate_raw_acc": pirate,
        "licensed_status": status_ok,
        "no_license_status": status_none,
        "wrong_license_status": status_other,
        "onnx_max_abs_diff": manifest["checks"]["onnx_max_abs_diff"],
        "test_items": int(len(data.y_test)),
        **extra,
        "seconds": round(time.perf_counter() - started, 1),
        "engine": engine,
        **(triton if engine == "triton" else {}),
    }
    rows = [
        ("baseline (unprotected CNN, torch)", f"{result['baseline_acc']:.2%}"),
        ("authorized: gRPC + license + trusted module", f"{authorized:.2%}" if preds is not None else status_ok),
        ("pirate: public.onnx on raw inputs", f"{pirate:.2%}"),
        ("no license", f"rejected: {status_none}"),
        ("license for another model", f"rejected: {status_other}"),
    ]
    if engine == "triton":
        steps = result["triton_ensemble"]
        rows += [("Triton model", f"ensemble: {' -> '.join(steps)}" if steps else "protected model (inline)"),
                 ("Triton HTTP, licensed", f"HTTP {result['http_status']}"),
                 ("Triton metrics families (nv_*, sealnet_*)", str(len(result["metrics"])))]
    if extra:
        rows += [(f"thief with {p} of the labels / black-box", f"{extra[f'stealing_ratio_{k}']:.3f}x")
                 for p, k in (("1%", "1pct"), ("10%", "10pct"))]
        rows.append(("insider (module queries) / black-box", f"{extra['insider_ratio']:.3f}x"))
    _print_table(f"sealnet demo ({len(data.y_test):,} test images)", "result", rows, rule=16)
    print(f"\nfinished in {result['seconds']} s; artefacts in {workdir}/")
    _write_json(json_path, result)
    ok = status_ok == "OK" and status_none != "OK" and status_other != "OK"
    ok = ok and (engine != "triton" or result["http_status"] == 200)
    if extra:
        print("\n(ratios: accuracy of the best copy / accuracy of the best black-box copy; <= 1.05 means a copy is "
              f"worth no more than query access; plots in {workdir / 'report'}/)")
    return 0 if ok else 1
