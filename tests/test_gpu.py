"""TensorRT / CUDA paths: run where a GPU with TensorRT exists, skipped (with the reason) everywhere else."""

from __future__ import annotations

import numpy as np
import pytest

from sealnet.export.build_engine import tensorrt_available

reason = tensorrt_available()
if reason:
    pytest.skip(f"no TensorRT here: {reason}", allow_module_level=True)


def test_tensorrt_engine_is_built_and_listed_in_the_manifest(tmp_path, artefacts):
    from sealnet.bundle import load_bundle
    from sealnet.export.build_engine import build_bundle

    manifest = build_bundle(artefacts["checkpoint_path"], tmp_path / "b", owner_key=artefacts["owner_key_path"],
                            keystore=artefacts["keystore"], tensorrt=True, log=lambda *_: None)
    assert "public.plan" in manifest["files"] and (tmp_path / "b" / "public.plan").stat().st_size > 0
    load_bundle(tmp_path / "b")


def test_runtime_picks_an_accelerated_provider_and_matches_cpu(artefacts, digits):
    import onnxruntime as ort

    from sealnet.onnx_session import ACCELERATED_PROVIDERS, ort_session

    if not set(ACCELERATED_PROVIDERS) & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime build has no CUDA / TensorRT execution provider (pip install onnxruntime-gpu)")
    onnx_path = artefacts["bundle"] / "public.onnx"
    gpu = ort_session(onnx_path, providers=["auto"])
    assert gpu.get_providers()[0] in ACCELERATED_PROVIDERS
    cpu = ort_session(onnx_path)
    x = digits.x_test[:32]
    assert np.abs(gpu.run(None, {"input": x})[0] - cpu.run(None, {"input": x})[0]).max() < 1e-2
