"""`sealnet attack` as a tester types it: listing, argument errors, and a whole run with its three reports."""

from __future__ import annotations

import json

import pytest

from sealnet.attacks.registry import all_attacks
from sealnet.cli import main
from sealnet.deployment import LocalDeployment
from sealnet.licenses import issue_license
from tests.conftest import MODEL_ID


def test_list_shows_every_attack_with_its_target(capsys):
    assert main(["attack", "--list"]) == 0
    out = capsys.readouterr().out
    for attack in all_attacks():
        assert attack.name in out and attack.targets in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "pass --bundle DIR"),
        (["--demo", "--endpoint", "127.0.0.1:1"], "--demo starts its own services"),
        (["--bundle", "/no/such/bundle"], "not a directory"),
        (["--demo", "--attack", "no-such-attack"], "unknown attack 'no-such-attack'"),
        (["--demo", "--suite", "protocol", "--attack", "pair-attack"], "belongs to suite 'protocol'"),
        (["--demo", "--fuzz-requests", "0"], "--fuzz-requests must be positive"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(argv, message, capsys):
    assert main(["attack", *argv]) == 2
    assert message in capsys.readouterr().err


def test_enclave_pid_needs_the_enclave_address(artefacts, capsys):
    assert main(["attack", "--bundle", str(artefacts["bundle"]), "--enclave-pid", "1"]) == 2
    assert "--enclave-pid needs --enclave" in capsys.readouterr().err


def test_unreachable_services_fail_fast(artefacts, short_tmp, capsys):
    assert main(["attack", "--suite", "protocol", "--bundle", str(artefacts["bundle"]),
                 "--enclave", f"unix:{short_tmp / 'none.sock'}"]) == 2
    assert "does not answer" in capsys.readouterr().err


def test_whole_suite_writes_json_markdown_and_plots_without_leaking_the_license(artefacts, short_tmp, tmp_path,
                                                                               capsys):
    token = issue_license(artefacts["owner_key"], customer_id="tester", model_id=MODEL_ID, serial_number="SN-CLI",
                          valid_seconds=600)
    (tmp_path / "lic").write_text(token + "\n")
    out = tmp_path / "report"
    with LocalDeployment(artefacts["bundle"], keystore=artefacts["keystore"],
                         enclave_address=f"unix:{short_tmp / 'e.sock'}") as d:
        code = main(["attack", "--suite", "all", "--bundle", str(artefacts["bundle"]), "--endpoint", d.endpoint,
                     "--enclave", d.enclave, "--license-file", str(tmp_path / "lic"),
                     "--owner-key", str(artefacts["owner_key_path"]), "--fuzz-requests", "200", "--out", str(out)])
    printed = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary and all(set(row) == {"attack", "metric", "value", "threshold", "passed"} for row in summary)
    assert code == (1 if any(row["passed"] is False for row in summary) else 0)
    ran = {a["attack"]: a for a in report["attacks"]}
    assert "skipped" in ran["fail-closed"] and "skipped" not in ran["remote-lockout"]
    assert not [a for a in report["attacks"] if "error" in a]
    assert all(a["knowledge"] for a in report["attacks"])
    rows = {(r["attack"], r["metric"]): r for r in summary}
    assert rows[("direct-piracy", "raw_acc")]["passed"] is True
    assert rows[("protocol-fuzz", "runtime.unprotected_answers")]["value"] == 0
    assert rows[("license-checks", "refused:expired")]["passed"] is True
    # report.md opens with the same summary table
    md = (out / "report.md").read_text().splitlines()
    table = [line for line in md[2 : 4 + len(summary)] if line.startswith("|")]
    assert table[0] == "| attack | metric | value | threshold | result |" and len(table) == len(summary) + 2
    assert table[2].startswith(f"| {summary[0]['attack']} | {summary[0]['metric']} |")
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["input_only.png", "model_stealing.png", "pair_attack.png", "protocol_fuzz.png",
                     "teeslice_stealing.png"]
    assert rows[("teeslice-stealing", "steal_ratio@10%")]["threshold"] == "<= 1.05"
    # a license is a bearer credential: neither the token nor its signature appears anywhere we wrote
    signature = token.split(".")[2]
    for text in [printed.out, printed.err, *(p.read_text() for p in out.glob("report.*"))]:
        assert token not in text and signature not in text


@pytest.mark.slow
def test_demo_suite_end_to_end(tmp_path):
    """The acceptance command (minutes): `sealnet attack --suite all --demo` writes the three kinds of report."""
    code = main(["attack", "--suite", "all", "--demo", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert code in (0, 1) and (tmp_path / "r" / "report.md").exists() and list((tmp_path / "r").glob("*.png"))
    fuzz = {r["metric"]: r for r in report["summary"] if r["attack"] == "protocol-fuzz"}
    assert fuzz["runtime.requests"]["value"] == fuzz["enclave.requests"]["value"] == 10_000
    assert all(fuzz[f"{s}.{k}"]["value"] == 0 for s in ("runtime", "enclave") for k in ("crashes", "hangs"))
    assert not [a for a in report["attacks"] if "error" in a or "skipped" in a]
