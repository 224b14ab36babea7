"""The TEESlice stealing protocol and the insider imitation, on tiny served bundles: what each side is given."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from sealnet.attacks.base import BUDGETS, Target
from sealnet.attacks.registry import get_attack
from sealnet.attacks.teeslice import copy_accuracies
from sealnet.licenses import issue_license
from tests.conftest import MODEL_ID, SEALED_HEAD_MODEL_ID, serving

BUDGET = replace(BUDGETS["small"], steal_fractions=(0.1,), steal_steps=40)


@contextlib.contextmanager
def _served_target(bundle, model_id: str, artefacts, sock_dir):
    token = issue_license(artefacts["owner_key"], customer_id="tester", model_id=model_id, serial_number="SN-T",
                          valid_seconds=600)
    with serving(bundle, artefacts["keystore"], sock_dir) as s:
        yield Target(bundle, endpoint=f"127.0.0.1:{s['service'].port}", enclave=s["enclave_addr"], license=token)


def test_black_box_gets_the_public_backbone_only_for_a_sealed_head(artefacts, sealed_head, short_tmp, tmp_path):
    attack = get_attack("teeslice-stealing")
    with _served_target(artefacts["bundle"], MODEL_ID, artefacts, short_tmp) as target:
        transform = attack.run(target, BUDGET, tmp_path)
    rows = transform.details["rows"]
    assert [r["fraction"] for r in rows] == [0.001, 0.1]
    assert set(rows[-1]["thief"]) == {"frozen public + new head", "fine-tuned public + new head",
                                      "fine-tuned public as is", "scratch"}
    assert set(rows[-1]["blackbox"]) == {"scratch"}
    judged = [m for m in transform.metrics if m.passed is not None]
    assert [m.name for m in judged] == ["steal_ratio@10%"] and judged[0].value > 0
    with _served_target(sealed_head["bundle"], SEALED_HEAD_MODEL_ID, artefacts, short_tmp) as target:
        sealed = attack.run(target, BUDGET, tmp_path)
    row = sealed.details["rows"][-1]
    # the published backbone is public anyway: whatever the thief does with it, the black-box attacker does too
    assert set(row["thief"]) == set(row["blackbox"]) == {"frozen public + new head", "fine-tuned public + new head",
                                                         "scratch"}


def test_copies_are_deterministic_so_the_ratio_measures_the_labels(sealed_head, digits):
    target = Target(sealed_head["bundle"])
    x, y = digits.x_train[:60], digits.y_train[:60]
    first = copy_accuracies(target, x, y, steps=20, seed=3)
    assert first == copy_accuracies(target, x, y, steps=20, seed=3)


def test_insider_learns_exactly_what_the_endpoint_tells(artefacts, sealed_head, short_tmp, tmp_path):
    with _served_target(sealed_head["bundle"], SEALED_HEAD_MODEL_ID, artefacts, short_tmp) as target:
        outcome = get_attack("insider-imitation").run(target, BUDGET, tmp_path)
    values = {m.name: m.value for m in outcome.metrics}
    # label policy: the module answers a natural feature vector with the label the endpoint gives its image, so
    # the insider's copy from natural queries is the black-box copy, bit for bit (same data, labels and seed)
    assert values["insider_acc[natural]"] == pytest.approx(values["blackbox_distilled_acc"], abs=0)
    assert values["insider_ratio"] == pytest.approx(max(values["insider_acc[natural]"],
                                                        values["insider_acc[natural + mixtures]"])
                                                    / values["blackbox_distilled_acc"])
