"""Serial numbers: stamps, signed records and claims, the CA registry, DSN students, the serial-number watermark,
verification against ONNX files and a KServe v2 endpoint, and serial-eval (tiny models on the 8x8 digits)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.ca import CAError, endorse, find_endorsement, init_ca, load_ca_key, load_ca_public_key, load_registry
from sealnet.cli import main
from sealnet.evaluate.serial_eval import deployed_predict, run_serial_eval
from sealnet.protect.checkpoint import load_checkpoint
from sealnet.protect.models import create_model
from sealnet.protect.serial import DSNTargets, DSNTrainingError, protect_dsn, stamp_torch, wrong_patterns
from sealnet.protect.train import TrainConfig, accuracy, train_plain
from sealnet.protect.watermark import WatermarkConfig, check_watermark, protect_watermark
from sealnet.serial import (
    SerialError,
    SerialRecord,
    _claim_payload,
    derive_pattern,
    derive_serial_vector,
    license_serial_number,
    load_claim,
    load_trigger_file,
    make_claim,
    make_trigger,
    match_serial,
    serial_path,
    sign_record,
    trigger_path,
    verify_claim,
)
from sealnet.stamp import StampSpec, stamp, stamp_scale

TINY = {"hidden": 128}
DSN_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=2e-3, seed=0, progress=False)
TEACHER_TRAIN = TrainConfig(epochs=20, batch_size=64, lr=2e-3, seed=0, progress=False)
WM_TRAIN = TrainConfig(epochs=20, batch_size=64, lr=2e-3, seed=0, progress=False)
RECORD = SerialRecord("sealnet-tests", "digits-dsn", 1_700_000_000, "acme")
WM_RECORD = SerialRecord("sealnet-tests", "digits-wm", 1_700_000_000, "all")


@pytest.fixture(scope="module")
def owner():
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture(scope="module")
def intruder():
    return Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _write_keys(root, key):
    root.mkdir(parents=True, exist_ok=True)
    (root / "owner.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (root / "owner.key.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return root / "owner.key", root / "owner.key.pub"


@pytest.fixture(scope="module")
def dsn(dsn_student):
    """The session's tiny DSN student (tests/conftest.py: RECORD, signed by the session's owner key)."""
    return dsn_student


@pytest.fixture(scope="module")
def dsn_owner(artefacts):
    return artefacts["owner_key"]


@pytest.fixture(scope="module")
def wm(tmp_path_factory, digits, owner):
    root = tmp_path_factory.mktemp("wm")
    ckpt = protect_watermark(digits, root / "wm.pt", WM_TRAIN, owner, WM_RECORD, model_config=TINY, trigger_seed=3,
                             wcfg=WatermarkConfig(trigger_size=50))
    torch.manual_seed(1)
    plain = create_model("simple_cnn", digits.input_shape, digits.num_classes, **TINY)
    train_plain(plain, digits, TrainConfig(epochs=10, batch_size=64, lr=2e-3, seed=1, progress=False))
    _export(ckpt.build_public_model(), root / "wm.onnx", digits.input_shape)
    _export(plain.eval(), root / "plain.onnx", digits.input_shape)
    return {"ckpt": ckpt, "path": root / "wm.pt", "plain": plain, "root": root}


def _export(model, path, input_shape):
    torch.onnx.export(model.eval(), (torch.zeros(1, *input_shape),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


# -- stamps and patterns (torch-free part) ---------------------------------------------------------------------------
def test_stamp_numpy_and_torch_are_bit_identical():
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 40, 40), dtype=np.float32)
    x0 = x.copy()
    pattern = derive_pattern(b"\x01" * 64)
    a = stamp(x, pattern, (5, 7), scale=2)
    b = stamp_torch(torch.from_numpy(x), pattern, (5, 7), 2).numpy()
    assert a.dtype == np.float32 and np.array_equal(a, b)
    block = np.kron(pattern, np.ones((2, 2)))
    assert np.array_equal(a[:, :, 5:11, 7:13], np.broadcast_to(block, (5, 3, 6, 6)))
    outside = np.ones(x.shape, bool)
    outside[:, :, 5:11, 7:13] = False
    assert np.array_equal(a[outside], x[outside])
    assert np.array_equal(x, x0)  # the input is not modified in place
    # one pattern per sample (training's wrong patterns) = the numpy stamp applied sample by sample
    per = wrong_patterns(torch.from_numpy(pattern), 5, 0.5, torch.Generator().manual_seed(0))
    assert not (per == torch.from_numpy(pattern)).all(dim=(1, 2)).any()
    c = stamp_torch(torch.from_numpy(x), per, (0, 0), 1).numpy()
    for i in range(5):
        assert np.array_equal(c[i : i + 1], stamp(x[i : i + 1], per[i].numpy(), (0, 0), 1))


def test_stamp_refuses_what_does_not_fit_and_scales_with_the_input():
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(SerialError, match="does not fit"):
        stamp(x, np.ones((3, 3), np.uint8), (6, 0))
    with pytest.raises(SerialError, match="0/1"):
        stamp(x, np.full((3, 3), 2), (0, 0))
    assert [stamp_scale(s) for s in ((1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 224, 224))] == [1, 1, 1, 8]
    spec = StampSpec(np.eye(3, dtype=np.uint8), (0, 0), stamp_scale((3, 224, 224)))
    big = spec.apply(np.full((1, 3, 224, 224), 0.5, np.float32))
    assert big[0, 0, :8, :8].min() == 1.0 and big[0, 0, :8, 8:16].max() == 0.0 and big[0, 0, 24, 24] == 0.5
    back = StampSpec.from_secret(spec.to_secret())
    assert np.array_equal(back.pattern, spec.pattern) and (back.position, back.scale) == ((0, 0), 8)
    with pytest.raises(SerialError, match="missing 'scale'"):
        StampSpec.from_secret({"pattern": [[0, 1], [1, 0]], "position": [0, 0]})


def test_pattern_is_deterministic_balanced_and_differs_across_customers_and_owners(owner, intruder):
    sig = sign_record(owner, RECORD)
    assert sig == sign_record(owner, RECORD)  # Ed25519 is deterministic: the owner can re-derive k at any time
    k = derive_pattern(sig)
    assert k.shape == (3, 3) and np.array_equal(k, derive_pattern(sig)) and 3 <= k.sum() <= 6
    customers = [derive_pattern(sign_record(owner, SerialRecord(RECORD.company, RECORD.model_id, RECORD.timestamp,
                                                                f"c{i}"))) for i in range(20)]
    assert len({p.tobytes() for p in customers}) >= 15
    assert not np.array_equal(k, derive_pattern(sign_record(intruder, RECORD)))
    assert derive_pattern(sig, (4, 6)).shape == (4, 6)
    with pytest.raises(SerialError, match="timestamp"):
        SerialRecord("a", "m", -1, "c")


def test_serial_vector_and_matching():
    sig = b"\x02" * 64
    i = derive_serial_vector(sig, 10)
    assert np.array_equal(i, derive_serial_vector(sig, 10)) and not np.array_equal(i, derive_serial_vector(b"\x03" * 64,
                                                                                                          10))
    assert set(np.unique(i)) <= {-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0}
    outputs = np.tile(i, (20, 1)) + np.random.default_rng(0).uniform(-0.9, 0.9, (20, 10))
    m = match_serial(outputs, i)
    assert m.matched and m.rate == 1.0 and m.decoded == [float(v) for v in i]
    outputs[3, 4] += 1.5
    assert match_serial(outputs, i).rate == 0.95 and not match_serial(outputs, i).matched
    assert match_serial(outputs, i, min_rate=0.9).matched


def test_claims_verify_and_tampering_is_caught(owner, intruder):
    sig = sign_record(owner, RECORD)
    claim = make_claim(owner, "dsn", RECORD, sig, pattern_size=(3, 3))
    assert verify_claim(claim).public_bytes_raw() == owner.public_key().public_bytes_raw()
    assert sig.hex() not in json.dumps(claim) and "pattern" not in claim  # k stays the owner's secret
    assert license_serial_number(claim["commitment"]).startswith("dsn-")
    forged = json.loads(json.dumps(claim))
    forged["record"]["customer_id"] = "mallory"
    with pytest.raises(SerialError, match="request_signature"):
        verify_claim(forged)
    wsig = sign_record(owner, WM_RECORD)
    trigger = make_trigger((1, 8, 8), 5, seed=0)
    wclaim = make_claim(owner, "watermark", WM_RECORD, wsig, serial=derive_serial_vector(wsig, 10), trigger=trigger)
    verify_claim(wclaim)
    # an intruder who copies the owner's serial vector cannot produce the signature it derives from
    isig = sign_record(intruder, WM_RECORD)
    copied = make_claim(intruder, "watermark", WM_RECORD, isig, serial=derive_serial_vector(wsig, 10), trigger=trigger)
    with pytest.raises(SerialError, match="not the vector derived"):
        verify_claim(copied)


# -- the certification authority -----------------------------------------------------------------------------------
def test_ca_registry_endorses_refuses_conflicts_and_detects_tampering(tmp_path, owner, intruder):
    key_path, pub_path, reg = init_ca(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        init_ca(tmp_path / "ca")
    ca = load_ca_key(tmp_path / "ca")
    sig = sign_record(owner, RECORD)
    dclaim = make_claim(owner, "dsn", RECORD, sig, pattern_size=(3, 3))
    wsig = sign_record(owner, WM_RECORD)
    wclaim = make_claim(owner, "watermark", WM_RECORD, wsig, serial=derive_serial_vector(wsig, 10),
                        trigger=make_trigger((1, 8, 8), 5, seed=0))
    assert endorse(reg, ca, dclaim)[1] and endorse(reg, ca, wclaim)[1]
    assert not endorse(reg, ca, wclaim)[1]  # idempotent
    registry = load_registry(reg, load_ca_public_key(pub_path))
    assert [e["index"] for e in registry["entries"]] == [0, 1]  # appending kept the first entry
    assert find_endorsement(registry, kind="watermark", owner_public_key=owner.public_key(),
                            serial=wclaim["serial"])["index"] == 1
    assert find_endorsement(registry, kind="watermark", owner_public_key=intruder.public_key(),
                            serial=wclaim["serial"]) is None
    # first come, first served: an intruder re-using the owner's DSN commitment is refused
    isig = sign_record(intruder, RECORD)
    stolen = make_claim(intruder, "dsn", RECORD, isig, pattern_size=(3, 3))
    stolen = {k: v for k, v in stolen.items() if k != "request_signature"} | {"commitment": dclaim["commitment"]}
    stolen["request_signature"] = intruder.sign(_claim_payload(stolen)).hex()
    with pytest.raises(CAError, match="already endorsed for owner"):
        endorse(reg, ca, stolen)
    # any edit to the registry breaks the CA signature; another CA's key is named as such
    data = json.loads(reg.read_text())
    data["entries"][0]["claim"]["record"]["customer_id"] = "mallory"
    reg.write_text(json.dumps(data))
    with pytest.raises(CAError, match="signature"):
        load_registry(reg, ca.public_key())
    other, _, _ = init_ca(tmp_path / "other-ca")
    with pytest.raises(CAError, match="not by the given CA key"):
        load_registry(tmp_path / "other-ca" / "registry.json", ca.public_key())


def test_ca_cli(tmp_path, owner, intruder, capsys):
    claim_path = tmp_path / "wm.serial.json"
    wsig = sign_record(owner, WM_RECORD)
    claim_path.write_text(json.dumps(make_claim(owner, "watermark", WM_RECORD, wsig,
                                                serial=derive_serial_vector(wsig, 10),
                                                trigger=make_trigger((1, 8, 8), 5, seed=0))))
    _, intruder_pub = _write_keys(tmp_path / "intruder", intruder)
    assert main(["ca", "init", "--out", str(tmp_path / "ca")]) == 0
    assert "PRIVATE" not in capsys.readouterr().out
    assert main(["ca", "endorse", "--ca", str(tmp_path / "ca"), "--serial", str(claim_path)]) == 0
    check = ["ca", "check", "--ca-public-key", str(tmp_path / "ca" / "ca.pub"), "--registry",
             str(tmp_path / "ca" / "registry.json"), "--serial", str(claim_path)]
    assert main(check) == 0
    assert main([*check, "--owner-public-key", str(intruder_pub)]) == 1
    reg = tmp_path / "ca" / "registry.json"
    reg.write_text(reg.read_text().replace('"all"', '"mallory"'))
    assert main(check) == 2
    assert "registry.json: field signature" in capsys.readouterr().err


# -- DSN -------------------------------------------------------------------------------------------------------------
def test_dsn_student_works_only_with_its_serial_number(dsn, digits, dsn_owner):
    m = dsn["ckpt"].metrics
    assert m["student_sn_acc"] >= 0.85 and m["student_sn_acc"] >= m["teacher_acc"] - 0.06
    assert m["student_raw_acc"] <= 0.3 and m["other_sn_mean_acc"] <= 0.4
    ckpt = load_checkpoint(dsn["path"])  # weights_only load keeps the secret usable
    spec = StampSpec.from_secret(ckpt.secret)
    assert np.array_equal(spec.pattern, derive_pattern(sign_record(dsn_owner, RECORD)))
    assert ckpt.secret["serial"]["customer_id"] == "acme" and spec.scale == 1 and spec.position == (0, 0)
    model = ckpt.build_public_model()  # Gd and the GRL are gone: the student is a plain registered model
    assert set(ckpt.public_state) == set(create_model("simple_cnn", digits.input_shape, 10, **TINY).state_dict())
    assert accuracy(model, spec.apply(digits.x_test), digits.y_test) == pytest.approx(m["student_sn_acc"])
    claim = load_claim(serial_path(dsn["path"]))
    verify_claim(claim)
    assert claim["commitment"] == ckpt.secret["commitment"] and "pattern" not in claim
    assert stat.S_IMODE(os.stat(dsn["teacher"]).st_mode) == 0o600
    assert load_checkpoint(dsn["teacher"]).metrics["teacher_acc"] == m["teacher_acc"]


def test_targets_judge_the_student_against_its_teacher():
    t = DSNTargets()
    good = {"teacher_acc": 0.97, "student_sn_acc": 0.951, "student_raw_acc": 0.2, "other_sn_max_acc": 0.2}
    assert t.misses(good) == []
    missed = t.misses(good | {"student_sn_acc": 0.949, "student_raw_acc": 0.21, "other_sn_max_acc": 0.5})
    assert [m.split(" ")[0] for m in missed] == ["with", "raw", "other"], missed
    assert "teacher 97.0% - 2 pts" in missed[0]
    assert DSNTargets(max_sn_drop=0.05).misses(good | {"student_sn_acc": 0.93}) == []


def test_a_collapsed_student_is_retrained_then_refused(dsn, digits, owner, tmp_path, capsys):
    """A learning rate far too high kills every hidden unit: each attempt is logged, then a clear error names the
    seeds and what to change; no checkpoint is written. The CLI turns it into exit code 2 without a traceback."""
    logged = []
    with pytest.raises(DSNTrainingError, match=r"in 2 attempts \(seed 0: with its SN .*\| seed 1: .*\); training "
                                               r"collapsed: try a smaller --lr"):
        protect_dsn(digits, tmp_path / "s.pt", TrainConfig(epochs=1, lr=5.0, progress=False), owner, RECORD,
                    teacher_path=dsn["teacher"], model_config=TINY, attempts=2, log=logged.append)
    assert len(logged) == 2 and "seed 0 missed its targets" in logged[0] and "next seed" in logged[0]
    assert not (tmp_path / "s.pt").exists()
    key, _ = _write_keys(tmp_path / "keys", owner)
    assert main(["protect", "dsn", "--dataset", "digits", "--owner-key", str(key), "--company", "c",
                 "--model-id", "m", "--customer", "x", "--timestamp", "1700000000", "--teacher", str(dsn["teacher"]),
                 "--student-epochs", "1",
                 "--lr", "5", "--attempts", "1", "--hidden", "128", "--out", str(tmp_path / "cli.pt")]) == 2
    assert "error: no DSN student met its targets in 1 attempts" in capsys.readouterr().err


def test_a_pattern_equal_to_another_customers_is_refused_before_training(dsn, digits, owner, tmp_path):
    """3x3 patterns: 512 values. For this owner key and timestamp, customer acme's pattern equals that of
    other-08: no student can keep other-08's SN out, so protect refuses at once and says what to change."""
    record = SerialRecord("sealnet-tests", "digits-dsn", 1_700_000_020, "acme")
    with pytest.raises(DSNTrainingError, match=r"equals that of other customer\(s\) \[8\] of the 20 checked \(512 "
                                               r"patterns in all\).*--pattern-size \(e.g. 4x4\)"):
        protect_dsn(digits, tmp_path / "s.pt", DSN_TRAIN, owner, record, teacher_path=dsn["teacher"],
                    model_config=TINY, log=lambda _: None)
    assert not (tmp_path / "s.pt").exists()


def test_a_student_that_still_works_without_its_serial_number_is_refused(dsn, digits, owner, tmp_path):
    """Barely trained (lr 1e-7), the student is still the teacher: accurate with its SN, but just as accurate
    without it. Not collapsed, yet no protection: refused, pointing at the protection settings."""
    with pytest.raises(DSNTrainingError, match=r"seed 0: (with its SN .*; )?raw [3-9]\d\.\d% > 20%; .*raw inputs "
                                               r"or other SNs still work: raise --student-epochs"):
        protect_dsn(digits, tmp_path / "s.pt", TrainConfig(epochs=1, lr=1e-7, progress=False), owner, RECORD,
                    teacher_path=dsn["teacher"], model_config=TINY, attempts=1, other_customers=3, log=lambda _: None)
    assert not (tmp_path / "s.pt").exists() and not serial_path(tmp_path / "s.pt").exists()


# -- the watermark and verification --------------------------------------------------------------------------------
def test_watermark_is_found_in_the_model_and_not_in_a_plain_one(wm, digits):
    m = wm["ckpt"].metrics
    assert m["watermark_match"] and m["watermark_rate"] == 1.0
    assert m["watermark_task_acc"] >= m["baseline_acc"] - 0.05
    s = wm["ckpt"].secret
    plain = check_watermark(wm["plain"], s["trigger"].numpy(), np.asarray(s["serial"]), s["tolerance"])
    assert plain.rate == 0.0 and not plain.matched
    tf = load_trigger_file(trigger_path(wm["path"]))
    assert stat.S_IMODE(os.stat(trigger_path(wm["path"])).st_mode) == 0o600
    assert np.array_equal(tf.trigger, s["trigger"].numpy()) and tf.claim == load_claim(serial_path(wm["path"]))


def test_verify_watermark_on_onnx_files_with_the_ca(wm, tmp_path, intruder, capsys):
    root = wm["root"]
    _, intruder_pub = _write_keys(tmp_path / "intruder", intruder)
    init_ca(tmp_path / "ca")
    endorse(tmp_path / "ca" / "registry.json", load_ca_key(tmp_path / "ca"), load_claim(serial_path(wm["path"])))
    base = ["verify", "--trigger", str(trigger_path(wm["path"])), "--registry", str(tmp_path / "ca" / "registry.json"),
            "--ca-public-key", str(tmp_path / "ca" / "ca.pub")]
    assert main([*base, "--onnx", str(root / "wm.onnx"), "--json", str(tmp_path / "v.json")]) == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["verified"] and res["match"]["rate"] == 1.0 and res["ca"]["endorsed"]
    assert main([*base, "--onnx", str(root / "plain.onnx")]) == 1
    assert "answer with the serial vector" in capsys.readouterr().out
    assert main([*base, "--onnx", str(root / "wm.onnx"), "--owner-public-key", str(intruder_pub)]) == 1
    with pytest.raises(SystemExit, match=r"--checkpoint \(or --bundle\) and --signature"):
        main(["verify"])


def test_verify_watermark_over_a_kserve_endpoint(wm):
    from sealnet.runtime.server import serve_unprotected

    for name, want in (("wm", 0), ("plain", 1)):  # a suspect's unprotected deployment of each model
        server, service = serve_unprotected(wm["root"] / f"{name}.onnx", "suspect", "127.0.0.1:0")
        try:
            assert main(["verify", "--trigger", str(trigger_path(wm["path"])), "--endpoint",
                         f"127.0.0.1:{service.port}", "--model", "suspect"]) == want
        finally:
            server.stop(0)


# -- serial-eval -----------------------------------------------------------------------------------------------------
def test_serial_eval_report(dsn, wm, digits, dsn_owner, tmp_path):
    with deployed_predict(dsn["path"]) as deployed:  # export, trusted module, runtime, gRPC with a license
        r = run_serial_eval(digits, tmp_path, dsn=dsn["ckpt"], watermark=wm["ckpt"],
                            dsn_kwargs={"owner_key": dsn_owner, "fractions": (0.1,), "steps": 20, "eval_every": 10,
                                        "prune_rates": (0.2,), "n_others": 5, "grpc_predict": deployed,
                                        "progress": False},
                            watermark_kwargs={"n_plain": 2, "plain_epochs": 1, "prune_rates": (0.1, 0.9),
                                              "progress": False})
    for key in ("teacher_acc", "student_sn_acc", "student_raw_acc", "other_sn_max_acc", "grpc_acc",
                "watermark_match", "watermark_task_acc", "plain_false_positives", "finetune10_acc", "scratch10_acc",
                "recenter10_acc"):
        assert r[key] is not None, key
    assert r["grpc_acc"] == pytest.approx(r["student_sn_acc"], abs=0.002)
    assert r["watermark_match"] is True and r["plain_false_positives"] == 0
    assert r["dsn"]["exhaustive"]["patterns"] == 512 and r["dsn"]["exhaustive"]["true_acc"] > 0.8
    assert len(r["dsn"]["attacks"][0]["finetune_curve"]) == 3
    effect = r["dsn"]["stamp_effect"]  # the stamp acts as (almost) one constant shift of the hidden layer
    assert effect["mean_per_image_std"] < 0.5 * effect["mean_abs_shift"], effect
    assert r["recenter10_acc"] > r["student_raw_acc"] + 0.2  # ...which unlabelled raw images partly undo
    assert json.loads((tmp_path / "serial_eval.json").read_text())["scratch10_acc"] == r["scratch10_acc"]
    for name in ("serial_eval.md", "serial_eval.png", "serial_curves.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_protect_cli_asks_for_the_serial_record(tmp_path):
    with pytest.raises(SystemExit, match="--owner-key, --company, --model-id, --customer"):
        main(["protect", "dsn", "--dataset", "digits", "--out", str(tmp_path / "x.pt")])


def _fresh_owner_key_with_a_distinct_pattern(record: SerialRecord) -> tuple[Ed25519PrivateKey, dict[str, int]]:
    """A fresh owner key whose SN pattern differs from the 20 other customers' that training checks: a 3x3 stamp
    has 512 patterns, so about 4% of random keys collide, and protect_dsn refuses those before training (tested
    by test_a_pattern_equal_to_another_customers_is_refused_before_training). Returns the key, the keys skipped
    and the nearest other pattern's distance in bits."""
    from sealnet.protect.serial import other_customer_specs

    skipped = 0
    while True:
        owner = Ed25519PrivateKey.generate()
        spec = StampSpec(derive_pattern(sign_record(owner, record)), (0, 0), 1)
        nearest = min(int((o.pattern != spec.pattern).sum()) for o in other_customer_specs(owner, record, spec, 20))
        if nearest > 0:
            return owner, {"skipped": skipped, "nearest": nearest}
        skipped += 1


@pytest.mark.slow
def test_acceptance_on_embedded_mnist(tmp_path):
    """The acceptance targets of docs/serial.md, with its recipe (about 10 minutes on 2 cores)."""
    from sealnet.data import mnist_embedded

    data = mnist_embedded()
    record = SerialRecord("sealnet demo", "mnist-dsn", 1_700_000_000, "acme")
    owner, _ = _fresh_owner_key_with_a_distinct_pattern(record)
    dsn_ckpt = protect_dsn(data, tmp_path / "dsn.pt", TrainConfig(epochs=30, progress=False), owner, record,
                           teacher_cfg=TrainConfig(epochs=8, progress=False), model_config={"hidden": 256})
    wm_ckpt = protect_watermark(data, tmp_path / "wm.pt", TrainConfig(epochs=12, progress=False), owner,
                                SerialRecord("sealnet demo", "mnist-wm", 1_700_000_000, "all"),
                                model_config={"hidden": 256}, trigger_seed=1)
    r = run_serial_eval(data, tmp_path / "eval", dsn=dsn_ckpt, watermark=wm_ckpt,
                        dsn_kwargs={"owner_key": owner, "progress": False}, watermark_kwargs={"progress": False})
    assert r["student_sn_acc"] >= r["teacher_acc"] - 0.01
    assert r["student_raw_acc"] <= 0.2 and r["other_sn_max_acc"] <= 0.2
    assert r["watermark_match"] and r["plain_false_positives"] == 0
    assert r["watermark_task_acc"] >= r["watermark_baseline_acc"] - 0.005
    if r["finetune10_acc"] > r["scratch10_acc"] + 0.02:  # the one target DSN misses here (docs/serial.md)
        pytest.xfail(f"fine-tuning with 10% of the data {r['finetune10_acc']:.1%} > scratch "
                     f"{r['scratch10_acc']:.1%} + 2 pts")


@pytest.mark.slow
def test_dsn_students_meet_their_targets_for_five_random_owner_keys(tmp_path):
    """Issue 15: training converges for any owner key. Five fresh keys (five SN patterns), the documented recipe
    (8-epoch teacher, 30-epoch students, up to 3 attempts), one teacher; each student is checked against the
    targets here, not only by protect_dsn's guard. A key whose pattern equals one of the 20 other customers'
    is refused before training (test_a_pattern_equal_to_another_customers_is_refused_before_training) and
    replaced by the next fresh key. About 25 minutes on 2 shared cores; the metrics go to stdout (-s)."""
    from sealnet.data import mnist_embedded

    data = mnist_embedded()
    rows, collisions = [], 0
    while len(rows) < 5:
        record = SerialRecord("sealnet demo", "mnist-dsn", 1_700_000_000, f"customer-{len(rows)}")
        owner, distances = _fresh_owner_key_with_a_distinct_pattern(record)
        collisions += distances["skipped"]
        m = protect_dsn(data, tmp_path / f"dsn-{len(rows)}.pt", TrainConfig(epochs=30, progress=False), owner,
                        record, teacher_path=tmp_path / "teacher.pt", teacher_cfg=TrainConfig(epochs=8, progress=False),
                        model_config={"hidden": 256}).metrics
        rows.append({k: m[k] for k in ("teacher_acc", "student_sn_acc", "student_raw_acc", "other_sn_max_acc",
                                       "student_attempts")} | {"nearest_other_sn_bits": distances["nearest"]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"keys_skipped_for_equal_patterns": collisions}), flush=True)
    for r in rows:
        assert r["student_sn_acc"] >= r["teacher_acc"] - 0.02, r
        assert r["student_raw_acc"] <= 0.2 and r["other_sn_max_acc"] <= 0.2, r
