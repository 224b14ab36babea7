"""The benchmark command runs end to end and writes its report (no timing is asserted: numbers are for bench/)."""

import json

from sealnet.bench.run import main
from sealnet.runtime.triton.server import triton_unavailable_reason


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    assert main(["--out", str(out), "--epochs", "0", "--batches", "2", "--concurrency", "2", "--duration", "0.3",
                 "--warmup", "0.1", "--skip-kserve", "--skip-training", "--json", str(tmp_path / "b.json")]) == 0
    report = json.loads((out / "bench.json").read_text())
    systems = {(r["system"], r["batch"], r["concurrency"]) for r in report["results"]}
    triton = triton_unavailable_reason() is None  # Triton (e) is measured wherever ./dev could install it
    assert systems == {("limit", 2, 1), ("unprotected", 2, 2), ("protected", 2, 2), ("sealed-head", 2, 2)} | (
        {("triton", 2, 2)} if triton else set())
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in report["results"])
    assert (out / "bench.png").stat().st_size > 0 and "| system | batch |" in (out / "bench.md").read_text()
    assert "KServe (d) skipped" in (out / "bench.md").read_text()
    summary = json.loads((tmp_path / "b.json").read_text())
    assert "protected_vs_kserve_b1_c16" in summary and summary["protected_vs_kserve_b1_c16"] is None
    assert summary["triton_vs_kserve_b1_c16"] is None and "triton_vs_limit_b64" in summary  # no b1/b64 rows here
