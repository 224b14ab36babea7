import numpy as np
import pytest
import torch

from sealnet.protect.checkpoint import load_checkpoint
from sealnet.protect.models import available_models, create_model
from sealnet.protect.pipeline import protect_transform
from sealnet.protect.train import TrainConfig, accuracy, transform_loss
from sealnet.protect.transform import (
    FixedPerturbation,
    create_transform,
    transform_to_arrays,
)
from tests.conftest import TINY, TINY_TRAIN


def test_registry_builds_the_papers_cnn_and_rejects_unknown_names():
    assert "simple_cnn" in available_models()
    model = create_model("simple_cnn", (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64] and [lin.out_features for lin in linears] == [1024, 10]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope", (1, 28, 28), 10)


def test_fixed_pattern_is_bipolar_with_probability_p():
    t = FixedPerturbation((1, 100, 100), sigma=0.1, p=0.2, seed=3)
    values, counts = np.unique(t.delta.numpy().round(6), return_counts=True)
    assert values.tolist() == pytest.approx([-0.1, 0.0, 0.1])
    frac = counts / counts.sum()
    assert frac[0] == pytest.approx(0.2, abs=0.02) and frac[2] == pytest.approx(0.2, abs=0.02)


def test_generator_is_input_dependent_and_bounded():
    t = create_transform("generator", (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    delta = t(x) - x
    assert delta.abs().max() <= 0.1 + 1e-6
    assert not torch.allclose(delta[0], delta[1])


@pytest.mark.parametrize("variant", ["fixed", "learned", "generator"])
def test_trusted_module_graph_computes_the_trained_transform(variant):
    from sealnet.enclave_sim.payload import pack, unpack
    from sealnet.enclave_sim.secrets.transform import transform_session

    t = create_transform(variant, (1, 8, 8), seed=5).eval()
    if variant == "generator":  # non-trivial weights, so a wrong wiring could not pass by accident
        with torch.no_grad():
            for p in t.parameters():
                p.normal_(0, 0.5)
    config, arrays = unpack(pack(*transform_to_arrays(t, (1, 8, 8))))
    session = transform_session(config, arrays)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        want = t(x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - x.numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="expected"):
        transform_session(config, {**arrays, "extra": np.zeros(1, np.float32)})


def test_loss_rewards_low_true_class_probability_on_raw_inputs():
    model = create_model("simple_cnn", (1, 8, 8), 10, hidden=16).eval()  # eval: no dropout noise
    t = create_transform("learned", (1, 8, 8))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    base = transform_loss(model, t, x, y, TrainConfig(beta=0.0))
    with_raw = transform_loss(model, t, x, y, TrainConfig(beta=1.0))
    q = torch.softmax(model(x), 1).gather(1, y[:, None]).mean()
    assert (with_raw - base).item() == pytest.approx(q.item(), rel=1e-4)


@pytest.mark.parametrize("variant", ["learned", "generator"])
def test_protected_model_works_only_through_its_transform(tmp_path, digits, variant):
    ckpt = protect_transform(digits, variant, tmp_path / "p.pt", TINY_TRAIN, model_config=TINY, baseline=True)
    m = ckpt.metrics
    assert m["authorized_acc"] >= m["baseline_acc"] - 0.05
    assert m["raw_acc"] <= 0.25
    loaded = load_checkpoint(tmp_path / "p.pt")
    assert (tmp_path / "p.pt").stat().st_mode & 0o777 == 0o600
    model, t = loaded.build_public_model(), loaded.build_transform()
    assert accuracy(model, digits.x_test, digits.y_test, t) == pytest.approx(m["authorized_acc"])


def test_training_is_reproducible_with_a_seed(tmp_path, digits):
    cfg = TrainConfig(epochs=1, batch_size=64, seed=7, progress=False)
    a = protect_transform(digits, "generator", tmp_path / "a.pt", cfg, model_config=TINY, baseline=False)
    b = protect_transform(digits, "generator", tmp_path / "b.pt", cfg, model_config=TINY, baseline=False)
    for k, v in a.public_state.items():
        assert torch.equal(v, b.public_state[k]), k


def test_checkpoint_loader_rejects_other_files(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a sealnet-checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="sealnet protect"):
        load_checkpoint(tmp_path / "missing.pt")
