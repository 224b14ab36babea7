"""Results over several seeds: the summary helpers, `serial-eval --seeds` and `passport-eval --seeds` (tiny models
on the 8x8 digits, shortened recipes: these tests are about the bookkeeping, not the numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.cli import main
from sealnet.evaluate.multiseed import flatten, spread, summarize
from sealnet.protect.checkpoint import load_checkpoint


def test_flatten_names_table_rows_and_drops_curves():
    report = {"acc": 0.9, "ok": True, "name": "x", "curve": [[0, 0.1], [10, 0.5]],
              "dsn": {"attacks": [{"fraction": 0.1, "acc": 0.5, "curve": [[0, 0.1]]}, {"fraction": 0.4, "acc": 0.7}],
                      "per_sn": [0.1, 0.2]}}
    assert flatten(report) == {"acc": 0.9, "ok": 1.0, "dsn.attacks@0.1.acc": 0.5, "dsn.attacks@0.4.acc": 0.7}
    s = summarize([{"a": 0.9, "b": 1.0}, {"a": 0.96}, {"a": 0.93}])
    assert s["a"] == pytest.approx({"mean": 0.93, "min": 0.9, "max": 0.96, "n": 3}) and s["b"]["n"] == 1
    assert spread(s["a"]) == "93.0% [90.0, 96.0]" and spread(s["b"]) == "100.0%" and spread(None) == "n/a"


def test_serial_eval_over_seeds_reports_mean_min_max(dsn_student, tmp_path, capsys, monkeypatch):
    """--seeds 2: two new students with the checkpoint's recipe, each with a fresh owner key (fixed here, so the
    test is deterministic), each evaluated; the summary holds mean within [min, max]."""
    import sealnet.evaluate.serial_eval as se

    keys = iter([Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (7, 8)])
    monkeypatch.setattr(se, "Ed25519PrivateKey", type("Keys", (), {"generate": staticmethod(lambda: next(keys))}))
    assert main(["serial-eval", "--dsn", str(dsn_student["path"]), "--teacher", str(dsn_student["teacher"]),
                 "--seeds", "2", "--no-deploy", "--others", "3", "--fractions", "0.1", "--attack-steps", "5",
                 "--out", str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json")]) == 0
    r = json.loads((tmp_path / "ev.json").read_text())
    assert r["seeds"] == 2 and r["completed"] == 2 and r["failed"] == []
    commitments = {load_checkpoint(tmp_path / "ev" / f"seed-{i}" / "dsn.pt").secret["commitment"] for i in (0, 1)}
    assert len(commitments) == 2 and dsn_student["ckpt"].secret["commitment"] not in commitments  # new keys
    s = r["summary"]
    for key in ("student_sn_acc", "student_raw_acc", "other_sn_max_acc", "dsn.attacks@0.1.finetune_acc"):
        assert s[key]["n"] == 2 and s[key]["min"] <= s[key]["mean"] <= s[key]["max"], key
    assert (tmp_path / "ev" / "seed-1" / "serial_eval.json").is_file()
    assert "| DSN student with its SN |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --teacher"):
        main(["serial-eval", "--dsn", str(dsn_student["path"]), "--seeds", "2"])


def test_a_student_that_misses_its_targets_is_a_listed_failed_run(dsn_student, digits, tmp_path):
    """A recipe that leaves the student as it started, the teacher (one attempt): the run is reported as failed,
    with protect's reason, and the summary covers only completed runs (none)."""
    from sealnet.evaluate.serial_eval import run_serial_eval_seeds

    ckpt = load_checkpoint(dsn_student["path"])
    ckpt.secret["train"] |= {"epochs": 1, "lr": 1e-7}  # the student stays the teacher: raw inputs still work
    r = run_serial_eval_seeds(digits, tmp_path, 1, dsn=ckpt, teacher_path=dsn_student["teacher"], deploy=False,
                              dsn_kwargs={"fractions": (0.1,), "steps": 5, "n_others": 3, "progress": False},
                              log=lambda _: None, attempts=1)
    assert r["completed"] == 0 and r["summary"] == {}
    assert "raw" in r["failed"][0]["error"] and "still work" in r["failed"][0]["error"]


def test_passport_eval_over_seeds_reports_mean_min_max(passport_v1, tmp_path, capsys):
    from sealnet.protect.passport_train import load_passport_file, save_passport_file

    secret = load_passport_file(passport_v1["passport_path"])
    pfile = tmp_path / "p.passport.pt"
    extra = {k: secret.pop(k) for k in ("model_name", "valid_acc", "config", "train")}
    save_passport_file(secret, pfile, **extra | {"train": extra["train"] | {"epochs": 3}})
    skip = [a for s in ("svd", "reverse", "insider", "pruning", "finetune", "deploy") for a in ("--skip", s)]
    assert main(["passport-eval", "--checkpoint", str(passport_v1["path"]), "--passport", str(pfile), "--seeds", "2",
                 "--signature", "tiny-sig", "--fakes", "5", *skip, "--out", str(tmp_path / "ev"),
                 "--json", str(tmp_path / "ev.json")]) == 0
    r = json.loads((tmp_path / "ev.json").read_text())
    assert [run["train_seed"] for run in r["runs"]] == [0, 1]
    s = r["summary"]
    for key in ("valid_acc", "baseline_acc", "valid_minus_baseline", "fake_max_acc", "signature_match"):
        assert s[key]["n"] == 2 and s[key]["min"] <= s[key]["mean"] <= s[key]["max"], key
    assert (tmp_path / "ev" / "seed-1" / "passport_eval.json").is_file()
    assert "| valid passport |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --signature"):
        main(["passport-eval", "--checkpoint", str(passport_v1["path"]), "--seeds", "2"])


def test_a_fresh_key_whose_pattern_collides_is_replaced_not_a_failed_run(dsn_student, digits, tmp_path,
                                                                             monkeypatch):
    """About 4% of fresh owner keys give an SN pattern equal to one of the 20 other customers' that training
    checks; protect_dsn refuses those before training. --seeds draws the next key instead of failing the run."""
    import sealnet.evaluate.serial_eval as se
    from sealnet.protect.serial import other_customer_specs, stamp_spec
    from sealnet.serial import SerialRecord, derive_pattern, sign_record
    from sealnet.stamp import StampSpec

    ckpt = load_checkpoint(dsn_student["path"])
    record = SerialRecord.from_dict({k: v for k, v in ckpt.secret["serial"].items() if k != "signature"})
    spec = stamp_spec(ckpt)

    def collides(key: Ed25519PrivateKey) -> bool:
        mine = StampSpec(derive_pattern(sign_record(key, record), spec.pattern.shape), spec.position, spec.scale)
        return any(np.array_equal(o.pattern, mine.pattern) for o in other_customer_specs(key, record, mine, 20))

    candidates = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 256)]
    bad = next(k for k in candidates if collides(k))
    good = next(k for k in candidates if not collides(k))
    keys = iter([bad, good])
    monkeypatch.setattr(se, "Ed25519PrivateKey", type("Keys", (), {"generate": staticmethod(lambda: next(keys))}))
    r = se.run_serial_eval_seeds(digits, tmp_path, 1, dsn=ckpt,
                                 teacher_path=dsn_student["teacher"], deploy=False,
                                 dsn_kwargs={"fractions": (0.1,), "steps": 5, "n_others": 3, "progress": False},
                                 log=lambda _: None)
    assert r["completed"] == 1 and r["failed"] == []
    assert next(keys, None) is None  # both keys drawn: the colliding one was replaced
