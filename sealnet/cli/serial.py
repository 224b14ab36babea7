"""CLI of the serial-number checks: `sealnet ca init|endorse|check`, `sealnet verify --trigger ...` and
`sealnet serial-eval`.

Torch-free at import time (the parser is built on every `sealnet` call); the commands import the rest lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None


# -- sealnet ca -------------------------------------------------------------------------------------------------
def add_ca_parser(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="certification authority for serial numbers").add_subparsers(dest="ca_cmd",
                                                                                                 required=True)
    p = ca.add_parser("init", help="create a CA key (0600), its public key and an empty signed registry")
    p.add_argument("--out", type=Path, required=True, help="CA directory")
    p.add_argument("--force", action="store_true", help="replace an existing CA key")
    p.set_defaults(func=cmd_ca_init)
    p = ca.add_parser("endorse", help="check an owner's claim (*.serial.json) and add it to the signed registry")
    p.add_argument("--ca", type=Path, required=True, help="CA directory or CA key file")
    p.add_argument("--serial", type=Path, required=True, help="the owner's claim (written by sealnet protect)")
    p.add_argument("--registry", type=Path, help="registry file (default: CA_DIR/registry.json)")
    p.set_defaults(func=cmd_ca_endorse)
    p = ca.add_parser("check", help="verify the registry's CA signature and whether a serial number is endorsed")
    p.add_argument("--ca-public-key", type=Path, required=True, help="CA public key (or the CA directory)")
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--serial", type=Path, help="a claim (*.serial.json) or a trigger file (*.trigger.npz)")
    p.add_argument("--owner-public-key", type=Path, help="the claimed owner (default: the claim's owner key)")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.set_defaults(func=cmd_ca_check)


def _default_registry(ca: Path) -> Path:
    from sealnet.ca import REGISTRY

    return (ca if ca.is_dir() else ca.parent) / REGISTRY


def cmd_ca_init(args: argparse.Namespace) -> int:
    from sealnet.ca import init_ca

    key, pub, reg = init_ca(args.out, force=args.force)
    print(f"CA key {key} (0600; keep it offline), public key {pub}, registry {reg}")
    return 0


def cmd_ca_endorse(args: argparse.Namespace) -> int:
    from sealnet.ca import endorse, load_ca_key
    from sealnet.serial import load_claim

    registry = args.registry or _default_registry(args.ca)
    claim = load_claim(args.serial)
    entry, added = endorse(registry, load_ca_key(args.ca), claim)
    rec = claim["record"]
    what = "endorsed" if added else "already endorsed"
    print(f"{what}: entry {entry['index']} of {registry}: {claim['kind']} serial number of owner "
          f"{claim['owner_key_id']} for model {rec['model_id']!r}, customer {rec['customer_id']!r}")
    return 0


def _claim_from(path: Path) -> dict[str, Any]:
    from sealnet.serial import load_claim, load_trigger_file

    return load_trigger_file(path).claim if path.suffix == ".npz" else load_claim(path)


def ca_check(registry_path: Path, ca_public_key: Path, claim: dict[str, Any] | None, owner_public_key: Path | None,
             *, serial: list[float] | None = None, model_id: str | None = None) -> dict[str, Any]:
    """{registry_valid, endorsed, entry, reason}: the CA signature over the registry, then an entry for the
    claimed owner (and the claim, or the watermark vector `serial`)."""
    from sealnet.ca import find_endorsement, load_ca_public_key, load_registry
    from sealnet.licenses import load_public_key, public_from_raw

    registry = load_registry(registry_path, load_ca_public_key(ca_public_key))
    if owner_public_key is not None:
        owner = load_public_key(owner_public_key)
    elif claim is not None:
        owner = public_from_raw(bytes.fromhex(claim["owner_public_key"]))
    else:
        raise ValueError("ca check needs --serial or --owner-public-key")
    kind = claim["kind"] if claim is not None else "watermark"
    entry = find_endorsement(registry, kind=kind, owner_public_key=owner, claim=claim if serial is None else None,
                             serial=serial, model_id=model_id)
    reason = "endorsed" if entry else "no entry of the registry endorses this serial number for this owner"
    return {"registry_valid": True, "endorsed": entry is not None, "entry": entry and entry["index"],
            "endorsed_at": entry and entry["endorsed_at"], "reason": reason}


def cmd_ca_check(args: argparse.Namespace) -> int:
    claim = _claim_from(args.serial) if args.serial else None
    res = ca_check(args.registry, args.ca_public_key, claim, args.owner_public_key)
    print(f"registry {args.registry}: CA signature valid")
    print(f"serial number {'ENDORSED' if res['endorsed'] else 'NOT endorsed'} for the claimed owner"
          + (f" (entry {res['entry']}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(res['endorsed_at']))})"
             if res["endorsed"] else ""))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["endorsed"] else 1


# -- sealnet verify --trigger -----------------------------------------------------------------------------------
def add_verify_serial_arguments(p: argparse.ArgumentParser) -> None:
    """Watermark verification options of `sealnet verify`; with --trigger it queries a suspect model (an ONNX
    file or a KServe v2 endpoint) instead of checking passports."""
    g = p.add_argument_group("black-box checks: serial-number watermark (--trigger with --onnx or --endpoint); "
                                 "passport V3: --onnx / --endpoint is the suspect the trigger set is sent to")
    g.add_argument("--trigger", type=Path, help="the owner's trigger file (*.trigger.npz from sealnet protect)")
    g.add_argument("--onnx", type=Path, help="suspect model as an ONNX file")
    g.add_argument("--endpoint", help="suspect KServe v2 gRPC endpoint HOST:PORT")
    g.add_argument("--model", help="model name at the endpoint (default: the claim's model id)")
    g.add_argument("--input-name", default="input", help="input tensor name at the endpoint")
    g.add_argument("--license-file", type=Path, help="license token to send to the endpoint, if it asks for one")
    g.add_argument("--tolerance", type=float, help="max |logit - i| (default: the trigger file's)")
    g.add_argument("--min-rate", type=float, help="share of trigger images that must match (default: the file's, 1)")
    g.add_argument("--registry", type=Path, help="CA registry; with --ca-public-key, also check the endorsement")
    g.add_argument("--ca-public-key", type=Path)
    g.add_argument("--owner-public-key", type=Path, help="claimed owner (default: the trigger file's owner key)")


def suspect_predict(args: argparse.Namespace, model_id: str) -> Any:
    """predict(x) -> logits on the suspect: an ONNX Runtime session or a KServe v2 client."""
    if (args.onnx is None) == (args.endpoint is None):
        raise SystemExit("sealnet verify: give exactly one of --onnx FILE or --endpoint HOST:PORT")
    if args.onnx is not None:
        from sealnet.onnx_session import ort_session

        if not args.onnx.is_file():
            raise FileNotFoundError(f"--onnx {args.onnx} not found")
        session = ort_session(args.onnx)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0], None
    from sealnet.runtime.client import InferenceClient

    token = args.license_file.read_text().strip() if args.license_file else None
    client = InferenceClient(args.endpoint, args.model or model_id)
    return lambda x: client.infer(x, token, input_name=args.input_name), client.close


def verify_watermark(predict: Any, trigger_file: Path, *, tolerance: float | None = None, min_rate: float | None = None,
                     registry: Path | None = None, ca_public_key: Path | None = None,
                     owner_public_key: Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Query the suspect with T and check i: {verified, match, claim_valid, ca, reasons, ...}."""
    import numpy as np

    from sealnet.licenses import load_public_key, public_raw
    from sealnet.serial import SerialError, load_trigger_file, match_serial, verify_claim

    tf = load_trigger_file(trigger_file)
    reasons: list[str] = []
    out = np.concatenate([np.asarray(predict(tf.trigger[i : i + batch_size]), np.float32)
                          for i in range(0, len(tf.trigger), batch_size)])
    match = match_serial(out, tf.serial, tf.tolerance if tolerance is None else tolerance,
                         tf.min_rate if min_rate is None else min_rate)
    if not match.matched:
        reasons.append(f"only {match.rate:.0%} of the trigger images answer with the serial vector")
    try:
        owner = verify_claim(tf.claim)
        claim_valid = True
        if owner_public_key is not None and public_raw(load_public_key(owner_public_key)) != public_raw(owner):
            claim_valid = False
            reasons.append("the serial vector belongs to another owner key than --owner-public-key")
    except SerialError as exc:
        claim_valid = False
        reasons.append(f"claim: {exc}")
    ca = None
    if registry is not None or ca_public_key is not None:
        if registry is None or ca_public_key is None:
            raise ValueError("give both --registry and --ca-public-key to check the CA endorsement")
        ca = ca_check(registry, ca_public_key, tf.claim, owner_public_key, serial=list(tf.serial),
                      model_id=tf.claim["record"]["model_id"])
        if not ca["endorsed"]:
            reasons.append(f"CA: {ca['reason']}")
    return {"verified": match.matched and claim_valid and (ca is None or ca["endorsed"]), "match": match.to_dict(),
            "serial": [float(v) for v in tf.serial], "claim_valid": claim_valid,
            "owner_key_id": tf.claim["owner_key_id"], "model_id": tf.claim["record"]["model_id"], "ca": ca,
            "reasons": reasons}


def cmd_verify_watermark(args: argparse.Namespace) -> int:
    from sealnet.serial import load_trigger_file

    model_id = load_trigger_file(args.trigger).claim["record"]["model_id"]
    predict, close = suspect_predict(args, model_id)
    try:
        res = verify_watermark(predict, args.trigger, tolerance=args.tolerance, min_rate=args.min_rate,
                               registry=args.registry, ca_public_key=args.ca_public_key,
                               owner_public_key=args.owner_public_key)
    finally:
        if close is not None:
            close()
    m = res["match"]
    print(f"ownership {'VERIFIED' if res['verified'] else 'NOT verified'} (owner {res['owner_key_id']}, model "
          f"{res['model_id']!r})")
    print(f"  watermark: {m['rate']:.0%} of the trigger images answer with i within tolerance "
          f"(max deviation {m['max_deviation']:.3f}); decoded {m['decoded']}, i = {res['serial']}")
    print(f"  owner signature over the serial record, and i derived from it: {'valid' if res['claim_valid'] else 'NO'}")
    if res["ca"] is None:
        print("  CA endorsement: not checked (pass --registry and --ca-public-key)")
    else:
        print(f"  CA endorsement: {'endorsed' if res['ca']['endorsed'] else 'NOT endorsed'} (registry signature "
              f"valid)")
    for reason in res["reasons"]:
        print(f"  - {reason}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["verified"] else 1


# -- sealnet serial-eval ----------------------------------------------------------------------------------------
def add_serial_eval_parser(sub: argparse._SubParsersAction) -> None:
    from sealnet.data import DATASETS

    p = sub.add_parser("serial-eval", help="DSN and serial-number watermark: accuracies, attacks, false positives")
    p.add_argument("--dsn", type=Path, help="a --method dsn checkpoint")
    p.add_argument("--teacher", type=Path, help="its teacher checkpoint (default: the accuracy recorded in --dsn)")
    p.add_argument("--owner-key", type=Path, help="owner key: other customers' SNs are derived from it "
                                                  "(default: random patterns)")
    p.add_argument("--watermark", type=Path, help="a --method watermark checkpoint")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoints'")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/serial-eval"), help="report directory")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--others", type=int, default=20, help="other customers' SNs to try on the DSN student")
    p.add_argument("--fractions", type=_fractions, default=(0.1, 0.2, 0.3, 0.4),
                   help="training-data fractions for the DSN attacks")
    p.add_argument("--attack-steps", type=int, default=300, help="Adam steps (batch 64) of each DSN attack")
    p.add_argument("--plain-models", type=int, default=20, help="plain models checked for watermark false positives")
    p.add_argument("--plain-epochs", type=int, default=2, help="epochs of each plain model")
    p.add_argument("--endpoint", help="KServe v2 endpoint serving the DSN student behind its trusted module: "
                                      "grpc_acc on raw test images (default: export the checkpoint and serve it "
                                      "locally for the measurement)")
    p.add_argument("--no-deploy", action="store_true", help="without --endpoint: leave grpc_acc unmeasured")
    p.add_argument("--model", help="model name at --endpoint")
    p.add_argument("--license-file", type=Path, help="license token for --endpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="N > 1: train N new models with the checkpoints' recipes (each with a fresh random owner key "
                        "and the next training seed; DSN students from --teacher), evaluate each, and report mean "
                        "and min/max (OUT/serial_eval_seeds.json, OUT/seed-i/)")
    p.set_defaults(func=cmd_serial_eval)


def _serial_eval_seeds(args: argparse.Namespace, data: Any, dsn: Any, wm: Any, dsn_kwargs: dict[str, Any]) -> int:
    from sealnet.evaluate.serial_eval import run_serial_eval_seeds, seeds_markdown

    if args.endpoint:
        raise SystemExit("sealnet serial-eval: --seeds trains new models; it cannot measure them at --endpoint")
    if dsn is not None and args.teacher is None:
        raise SystemExit("sealnet serial-eval --seeds with --dsn: give --teacher (new students distil from it)")
    r = run_serial_eval_seeds(data, args.out, args.seeds, dsn=dsn, teacher_path=args.teacher, watermark=wm,
                              dsn_kwargs=dsn_kwargs,
                              watermark_kwargs={"n_plain": args.plain_models, "plain_epochs": args.plain_epochs},
                              deploy=not args.no_deploy, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    print(seeds_markdown(r))
    print(f"report: {args.out}/serial_eval_seeds.{{json,md}}, one run per {args.out}/seed-i/", file=sys.stderr)
    return 0 if not r["failed"] else 2


def cmd_serial_eval(args: argparse.Namespace) -> int:
    from sealnet.data import load_dataset
    from sealnet.evaluate.serial_eval import markdown_report, run_serial_eval
    from sealnet.protect.checkpoint import load_checkpoint

    if args.dsn is None and args.watermark is None:
        raise SystemExit("sealnet serial-eval: give --dsn CHECKPOINT and/or --watermark CHECKPOINT")
    dsn = load_checkpoint(args.dsn) if args.dsn else None
    wm = load_checkpoint(args.watermark) if args.watermark else None
    ref = dsn or wm
    data = load_dataset(args.dataset or ref.dataset, args.data_dir, seed=ref.seed)
    dsn_kwargs: dict[str, Any] = {"n_others": args.others, "fractions": args.fractions, "steps": args.attack_steps,
                                  "seed": args.seed}
    if args.seeds > 1:
        return _serial_eval_seeds(args, data, dsn, wm, dsn_kwargs)
    with contextlib.ExitStack() as stack:
        if dsn is not None:
            if args.teacher:
                dsn_kwargs["teacher"] = load_checkpoint(args.teacher).build_public_model()
            if args.owner_key:
                from sealnet.licenses import load_owner_key

                dsn_kwargs["owner_key"] = load_owner_key(args.owner_key)
            if args.endpoint:
                from sealnet.runtime.client import InferenceClient

                token = args.license_file.read_text().strip() if args.license_file else None
                client = InferenceClient(args.endpoint, args.model or dsn.secret["serial"]["model_id"])
                stack.callback(client.close)
                dsn_kwargs["grpc_predict"] = lambda x: client.infer(x, token)
            elif not args.no_deploy:
                from sealnet.evaluate.serial_eval import deployed_predict

                dsn_kwargs["grpc_predict"] = stack.enter_context(deployed_predict(args.dsn, args.data_dir))
        r = run_serial_eval(data, args.out, dsn=dsn, watermark=wm, dsn_kwargs=dsn_kwargs,
                            watermark_kwargs={"n_plain": args.plain_models, "plain_epochs": args.plain_epochs,
                                              "seed": args.seed})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    print(markdown_report(r))
    print(f"report: {args.out}/serial_eval.{{json,md,png}}, {args.out}/serial_curves.png", file=sys.stderr)
    return 0
