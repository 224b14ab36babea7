"""The thief's rebuild of public.onnx is faithful (same outputs as ONNX Runtime) and trainable, for every
method's public network."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sealnet.bundle import PUBLIC_ONNX
from sealnet.onnx_session import ort_session
from sealnet.protect.onnx_torch import OnnxModule, penultimate


@pytest.mark.parametrize("fixture", ["artefacts", "passport_bundle", "dsn_student"])
def test_rebuild_matches_onnx_runtime_and_trains(fixture, request, digits):
    bundle = request.getfixturevalue(fixture)["bundle"]
    model = onnx.load(str(bundle / PUBLIC_ONNX))
    x = digits.x_test[:32]
    want = ort_session(bundle / PUBLIC_ONNX).run(None, {"input": x})[0]
    net = OnnxModule(model)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    cut, width = penultimate(model)
    trunk = OnnxModule(model, output=cut)
    with torch.no_grad():
        assert trunk(torch.from_numpy(x)).shape == (32, width)
    loss = net(torch.from_numpy(x)).square().mean()
    loss.backward()
    # gradients reach the weights (a passport network's zeroed gamma/beta block most of them, by design)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    fresh = OnnxModule(model).reinitialize(seed=0)
    with torch.no_grad():
        assert np.abs(fresh(torch.from_numpy(x)).numpy() - want).max() > 1e-2
