"""Model attacks of `sealnet attack` on the tiny digits bundles: each measures the direction it should."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sealnet.attacks.base import BUDGETS, Skip, Target
from sealnet.attacks.registry import get_attack, select
from sealnet.attacks.stealing import public_torch_model
from sealnet.deployment import LocalDeployment
from sealnet.enclave_sim.keystore import init_keystore
from sealnet.enclave_sim.keystore_spec import KeystoreSpec
from sealnet.export.build_engine import build_bundle
from sealnet.licenses import issue_license
from sealnet.protect.pipeline import protect_transform
from sealnet.protect.train import TrainConfig
from tests.conftest import MODEL_ID, TINY

BUDGET = replace(BUDGETS["small"], input_only_trials=8, one_pair_trials=4, pair_fractions=(0.1, 1.0), pair_trials=2,
                 pair_steps=300, steal_fractions=(0.1,), steal_steps=60)


def _license(owner_key) -> str:
    return issue_license(owner_key, customer_id="tester", model_id=MODEL_ID, serial_number="SN-T", valid_seconds=600)


@pytest.fixture(scope="module")
def generator_target(artefacts):
    """The session's Generator bundle behind a real trusted module (pairs come from it, with a license)."""
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"], runtime=False) as d:
        yield Target(artefacts["bundle"], enclave=d.enclave, license=_license(artefacts["owner_key"]))


@pytest.fixture(scope="module")
def fixed_target(artefacts, digits, tmp_path_factory):
    """A Fixed-transform bundle (a universal perturbation) behind its own trusted module."""
    root = tmp_path_factory.mktemp("fixed")
    protect_transform(digits, "fixed", root / "fixed.pt", TrainConfig(epochs=2, batch_size=64, lr=2e-3, seed=0,
                                                                      progress=False),
                      model_config=TINY, baseline=False)
    init_keystore(root / "keystore")
    keystore = KeystoreSpec("embedded", root / "keystore")
    build_bundle(root / "fixed.pt", root / "bundle", owner_key=artefacts["owner_key_path"], keystore=keystore,
                 model_id=MODEL_ID, max_raw_acc=1.0, log=lambda *_: None)
    with LocalDeployment(root / "bundle", keystore=keystore, runtime=False) as d:
        yield Target(root / "bundle", enclave=d.enclave, license=_license(artefacts["owner_key"]))


def _metrics(outcome) -> dict:
    return {m.name: m for m in outcome.metrics}


def test_registry_lists_model_attacks_for_the_transform_method():
    names = [a.name for a in select("model") if a.applies_to("transform")]
    assert names == ["utility", "direct-piracy", "input-only", "one-pair", "pair-attack", "model-stealing",
                     "teeslice-stealing"]
    shared = [a.name for a in select("model") if a.name in names and (a.applies_to("passport") or a.applies_to("dsn"))]
    # a DSN student is a complete network too: fine-tuning it is the same attack
    assert shared == ["model-stealing", "teeslice-stealing"]
    assert all(a.knowledge and a.targets for a in select("all"))


def test_direct_piracy_and_input_only_stay_far_below_authorized(artefacts, tmp_path):
    target = Target(artefacts["bundle"])  # A1: bundle files only, no services
    authorized, source = target.authorized_accuracy()
    assert "manifest" in source and authorized > 0.85
    raw = _metrics(get_attack("direct-piracy").run(target, BUDGET, tmp_path))["raw_acc"]
    assert raw.passed and raw.value <= 0.3 and authorized - raw.value > 0.5
    out = get_attack("input-only").run(target, BUDGET, tmp_path)
    m = _metrics(out)
    assert len(out.details["accuracies"]) == BUDGET.input_only_trials
    assert m["mean_acc"].value <= m["best_acc"].value < authorized - 0.3
    assert (tmp_path / "input_only.png").stat().st_size > 1000


def test_one_pair_recovers_a_fixed_transform_exactly(fixed_target, tmp_path):
    authorized, source = fixed_target.authorized_accuracy()
    assert source.startswith("measured")
    out = get_attack("one-pair").run(fixed_target, BUDGET, tmp_path)
    best = _metrics(out)["best_acc"]
    assert out.details["universal_perturbation"] is True
    assert best.value == pytest.approx(authorized, abs=0.004)  # x_r + delta == x_p: the authorized accuracy
    assert best.passed is False  # the report calls it a FAIL, as it is
    with pytest.raises(Skip, match="universal"):
        get_attack("pair-attack").run(fixed_target, BUDGET, tmp_path)


def test_pair_attack_imitates_the_generator_and_more_pairs_do_not_hurt(generator_target, tmp_path):
    authorized, _ = generator_target.authorized_accuracy()
    raw = generator_target.public_accuracy(generator_target.data.x_test)
    out = get_attack("pair-attack").run(generator_target, BUDGET, tmp_path)
    m = _metrics(out)
    few, all_ = out.details["results"]["0.10"], out.details["results"]["1.00"]
    assert [r["pairs"] for r in few] == [round(0.1 * len(generator_target.data.x_train))] * 2
    # the measured direction: the imitation works on the tiny model, with all pairs at least as well as with few
    assert m["best_acc@100%"].value >= authorized - 0.05 and m["best_acc@100%"].value > raw + 0.5
    assert m["best_acc@100%"].value >= m["best_acc@10%"].value - 0.02
    assert np.mean([r["relative_mse"] for r in all_]) <= 1.5 * np.mean([r["relative_mse"] for r in few])
    assert m["best_acc@100%"].threshold == f"<= {authorized - 0.10:.4g}"
    assert (tmp_path / "pair_attack.png").exists()


def test_generator_one_pair_attack_reports_the_shared_part_of_the_perturbation(generator_target, tmp_path):
    out = get_attack("one-pair").run(generator_target, BUDGET, tmp_path)
    assert out.details["universal_perturbation"] is False
    assert 0 < out.details["shared_energy"] <= 1 and "same for every input" in out.notes[0]


def test_public_network_is_rebuilt_from_onnx_and_fine_tuning_it_beats_scratch(artefacts, digits, tmp_path):
    target = Target(artefacts["bundle"])
    model = public_torch_model(target.bundle.path("public.onnx"), digits.input_shape, digits.num_classes)
    x = digits.x_test[:32]
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    assert np.abs(ours - target.public_session.run(None, {"input": x})[0]).max() < 1e-4
    out = get_attack("model-stealing").run(target, BUDGET, tmp_path)
    row = out.details["rows"][0]
    assert row["images"] == round(0.1 * len(digits.x_train))
    # the public weights carry the model's value: fine-tuning them beats training from scratch
    assert row["stolen_acc"] > row["scratch_acc"]
    assert _metrics(out)["stolen_acc@10%"].limit == pytest.approx(row["scratch_acc"] + 0.02)
