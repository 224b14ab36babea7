"""The `sealnet` command as users type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sealnet.cli import main


def test_license_keygen_issue_inspect(tmp_path, capsys):
    key = tmp_path / "owner.key"
    assert main(["license", "keygen", str(key)]) == 0
    assert main(["license", "issue", "--owner-key", str(key), "--customer", "acme", "--model", "m1",
                 "--serial", "SN-9", "--days", "1", "--out", str(tmp_path / "lic")]) == 0
    assert (tmp_path / "lic").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    assert main(["license", "inspect", f"@{tmp_path / 'lic'}", "--owner-public-key", f"{key}.pub"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["serial_number"] == "SN-9" and shown["signature"].startswith("valid")
    # a second keygen onto the same path is refused, not silently replacing the owner key
    assert main(["license", "keygen", str(key)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_inspect_with_the_wrong_owner_key_fails(tmp_path, capsys):
    main(["license", "keygen", str(tmp_path / "a.key")])
    main(["license", "keygen", str(tmp_path / "b.key")])
    main(["license", "issue", "--owner-key", str(tmp_path / "a.key"), "--customer", "c", "--model", "m",
          "--serial", "s", "--out", str(tmp_path / "lic")])
    assert main(["license", "inspect", f"@{tmp_path / 'lic'}", "--owner-public-key", str(tmp_path / "b.key.pub")]) == 2
    assert "bad signature" in capsys.readouterr().err


def test_enclave_refuses_to_start_on_a_tampered_bundle(bundle_copy, artefacts, short_tmp, capsys):
    blob = bytearray((bundle_copy / "secrets.sealed").read_bytes())
    blob[40] ^= 0x80
    (bundle_copy / "secrets.sealed").write_bytes(bytes(blob))
    from sealnet.enclave_sim.__main__ import main as enclave_main  # what `sealnet enclave` execs, run in this process

    code = enclave_main(["--bundle", str(bundle_copy), "--keystore-dir", str(artefacts["keystore"].directory),
                         "--listen", f"unix:{short_tmp / 's.sock'}", "--state-dir", str(short_tmp / "state")])
    assert code == 2 and "secrets.sealed does not match" in capsys.readouterr().err


def test_protect_and_infer_commands(tmp_path, artefacts, short_tmp, capsys):
    """`sealnet protect` on the tiny data, then `sealnet infer` against a running endpoint."""
    from sealnet.deployment import LocalDeployment
    from tests.conftest import MODEL_ID

    assert main(["protect", "transform", "--variant", "learned", "--dataset", "digits", "--epochs", "1",
                 "--no-baseline", "--out", str(tmp_path / "p.pt")]) == 0
    assert "authorized accuracy" in capsys.readouterr().out
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"],
                         enclave_address=f"unix:{short_tmp / 'e.sock'}") as d:
        main(["license", "issue", "--owner-key", str(artefacts["owner_key_path"]), "--customer", "c",
              "--model", MODEL_ID, "--serial", "s", "--out", str(tmp_path / "lic")])
        capsys.readouterr()
        assert main(["infer", "--server", d.endpoint, "--model", MODEL_ID, "--dataset", "digits",
                     "--license-file", str(tmp_path / "lic"), "--count", "50"]) == 0
        out = capsys.readouterr().out
        assert "accuracy on 50 test images" in out
        assert main(["infer", "--server", d.endpoint, "--model", MODEL_ID,
                     "--dataset", "digits", "--count", "5"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_generated_grpc_code_matches_the_protos(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "scripts" / "gen_proto.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("inference_pb2.py", "inference_pb2_grpc.py", "enclave_pb2.py", "enclave_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (root / "sealnet" / "_grpc" / name).read_text(), (
            f"{name} is stale: run python scripts/gen_proto.py")


def test_demo_runs_end_to_end_and_meets_the_acceptance_numbers(tmp_path):
    """The README's demo, full size (about a minute on 2 cores): real child processes, real sockets."""
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "sealnet", "demo", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["no_license_status"] == "UNAUTHENTICATED"
    assert r["wrong_license_status"] == "PERMISSION_DENIED"
    assert r["authorized_acc"] == pytest.approx(r["authorized_torch_acc"], abs=0.002)
    assert r["authorized_acc"] >= r["baseline_acc"] - 0.015
    assert r["pirate_raw_acc"] <= 0.15
    assert "pirate: public.onnx on raw inputs" in proc.stdout
    # no byte of the sealed transform or the keystore's root key reaches what the edge host writes
    from sealnet.protect.checkpoint import load_checkpoint

    work = tmp_path / "w"
    secret = load_checkpoint(work / "protected.pt").secret["state"]
    needles = [t.numpy().astype("<f4").tobytes() for t in secret.values()]
    needles = [n[i : i + 16] for n in needles for i in range(0, len(n) - 16, 64)]
    root_key = (work / "keystore" / "root.key").read_bytes()
    needles += [root_key, root_key.hex().encode()]
    edge_files = [p for p in (work / "bundle").iterdir()] + [p for p in (work / "logs").iterdir()] + [out]
    assert (work / "logs" / "audit.jsonl").stat().st_size > 0
    for path in edge_files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"secret bytes in {path.name}"
    assert not any(n in (proc.stdout + proc.stderr).encode() for n in needles)


def test_sealed_head_demo_meets_the_black_box_targets(tmp_path):
    """`sealnet demo --method sealed-head`, full size (about 80 s on 2 cores): a copy worth no more than black-box
    access, measured against the live deployment; the sealed head's weights never reach the edge host's files."""
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "sealnet", "demo", "--method", "sealed-head", "--workdir",
                           str(tmp_path / "w"), "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["no_license_status"] == "UNAUTHENTICATED" and r["wrong_license_status"] == "PERMISSION_DENIED"
    assert r["authorized_acc"] >= r["baseline_acc"] - 0.015
    assert r["pirate_raw_acc"] <= 0.15
    assert r["stealing_ratio_1pct"] <= 1.05 and r["stealing_ratio_10pct"] <= 1.05 and r["insider_ratio"] <= 1.05
    assert "insider (module queries) / black-box" in proc.stdout
    from sealnet.protect.checkpoint import load_checkpoint

    work = tmp_path / "w"
    head = load_checkpoint(work / "protected.pt").secret["head_state"]
    needles = [t.numpy().astype("<f4").tobytes() for t in head.values() if t.numel() >= 16]
    needles = [n[i : i + 16] for n in needles for i in range(0, len(n) - 16, 256)]
    for path in [*(work / "bundle").iterdir(), *(work / "logs").iterdir(), out]:
        data = path.read_bytes()
        assert not any(n in data for n in needles), f"sealed head bytes in {path.name}"


def test_demo_seeds_reports_mean_and_spread_and_fails_if_any_run_fails(tmp_path, monkeypatch, capsys):
    """`sealnet demo --seeds N`: one run per seed in WORKDIR/seed-i (the runs themselves are the demo tested
    above), mean/min/max of each number, exit 1 when any run failed."""
    import sealnet.demo as demo

    seen = []

    def one_run(workdir, *, seed, json_path, **kwargs):
        seen.append((Path(workdir).name, seed, kwargs["method"]))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"baseline_acc": 0.97, "authorized_acc": 0.95 + (seed - 10) / 100,
                                         "pirate_raw_acc": 0.1, "seconds": 60.0}))
        return 1 if seed == 12 else 0

    monkeypatch.setattr(demo, "run_demo", one_run)
    out = tmp_path / "seeds.json"
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--seeds", "2", "--seed", "10", "--json", str(out)]) == 0
    assert seen == [("seed-0", 10, "transform"), ("seed-1", 11, "transform")]
    r = json.loads(out.read_text())
    assert r["runs_succeeded"] == 2
    assert r["summary"]["authorized_acc"] == pytest.approx({"mean": 0.955, "min": 0.95, "max": 0.96, "n": 2})
    assert "95.5% [95.0, 96.0]" in capsys.readouterr().out
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--seeds", "3", "--seed", "10"]) == 1
