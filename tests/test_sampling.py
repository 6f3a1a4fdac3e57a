"""graphcache.sampling against an independent re-derivation of the reference (guided-diffusion) sampler.

The reference below is written from the formulas of facebookresearch/DiT `diffusion/` with Python floats and
loops, NOT with graphcache.sampling's internals: linear betas by formula, products by loop,
respacing by the accumulate-and-round loop, per-step coefficients as float64 scalars cast to
float32, then the reference's float32 update order. On CPU the two implementations agree to
rtol = atol = 1e-6 (in practice bitwise); that is the tolerance asserted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphcache.errors import GraphcacheError
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.sampling import Diffusion, guided, sample, space_timesteps

TOL = dict(rtol=1e-6, atol=1e-6)
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


def ref_kept_timesteps(S: int) -> list[int]:
    """Reference respacing for a single section of 1000 steps: accumulate stride, round each."""
    if S == 1:
        return [0]
    stride = 999 / (S - 1)
    out, pos = [], 0.0
    for _ in range(S):
        out.append(round(pos))
        pos = pos + stride
    return sorted(set(out))


def ref_schedule(S: int) -> tuple[list[int], list[dict]]:
    """(timestep_map, per-step coefficient dicts of Python float64 values)."""
    betas = [0.0001 + (0.02 - 0.0001) * k / 999 for k in range(1000)]
    acp_full, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        acp_full.append(prod)
    kept = ref_kept_timesteps(S)
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1.0 - acp_full[t] / last)
        last = acp_full[t]

    steps, prod = [], 1.0
    for b in new_betas:
        prev = prod
        prod = prod * (1.0 - b)
        steps.append(
            dict(
                beta=b,
                acp=prod,
                acp_prev=prev,
                sqrt_recip=math.sqrt(1.0 / prod),
                sqrt_recipm1=math.sqrt(1.0 / prod - 1.0),
                post_var=b * (1.0 - prev) / (1.0 - prod),
                coef1=b * math.sqrt(prev) / (1.0 - prod),
                coef2=(1.0 - prev) * math.sqrt(1.0 - b) / (1.0 - prod),
            )
        )
    for i, s in enumerate(steps):  # log variance clipped: step 0 borrows step 1's variance
        if i > 0:
            s["log_var_clipped"] = math.log(s["post_var"])
        else:  # one-step schedule: no entry 1 to borrow; graphcache uses beta_0
            s["log_var_clipped"] = math.log(steps[1]["post_var"] if len(steps) > 1 else s["beta"])
        s["log_beta"] = math.log(s["beta"])
    return kept, steps


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).float()


def ref_cfg(model, scale: float, n_guided: int):
    def fn(x, t, y):
        h = x.shape[0] // 2
        out = model(torch.cat([x[:h], x[:h]]), t, y)
        g = out[h:, :n_guided] + scale * (out[:h, :n_guided] - out[h:, :n_guided])
        top = torch.cat([g, out[:h, n_guided:]], dim=1)
        bottom = torch.cat([g, out[h:, n_guided:]], dim=1)
        return torch.cat([top, bottom], dim=0)

    return fn


def ref_sample(model, labels, S, sampler, seed=0, cfg_scale=None, n_guided=3, noise=None):
    C, H = model.in_channels, model.input_size
    n = len(labels)
    kept, steps = ref_schedule(S)
    torch.manual_seed(seed)
    x = torch.randn(n, C, H, H) if noise is None else noise
    y = torch.tensor(labels)
    fn = model
    if cfg_scale is not None and cfg_scale > 1:
        x = torch.cat([x, x])
        y = torch.cat([y, torch.full((n,), model.num_classes)])
        fn = ref_cfg(model, cfg_scale, n_guided)
    with torch.no_grad():
        for i in reversed(range(len(kept))):
            s = steps[i]
            out = fn(x, torch.tensor([kept[i]] * x.shape[0]), y)
            eps, v = out[:, :C], out[:, C:]
            pred_x0 = f32(s["sqrt_recip"]) * x - f32(s["sqrt_recipm1"]) * eps
            noise = torch.randn_like(x)
            if sampler == "ddim":
                eps2 = (f32(s["sqrt_recip"]) * x - pred_x0) / f32(s["sqrt_recipm1"])
                x = pred_x0 * torch.sqrt(f32(s["acp_prev"])) + torch.sqrt(1 - f32(s["acp_prev"])) * eps2
            else:
                frac = (v + 1) / 2
                log_var = frac * f32(s["log_beta"]) + (1 - frac) * f32(s["log_var_clipped"])
                mean = f32(s["coef1"]) * pred_x0 + f32(s["coef2"]) * x
                if i > 0:
                    x = mean + torch.exp(0.5 * log_var) * noise
                else:
                    x = mean
    return x[:n]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                    num_classes=NUM_CLASSES)
    return init_random_(DiT(cfg), std=0.05).eval()


class Recorder:
    """Wraps a model: counts calls, records inputs and start_sampling calls."""

    def __init__(self, model):
        self.model = model
        for a in ("in_channels", "input_size", "learn_sigma", "num_classes"):
            setattr(self, a, getattr(model, a))
        self.calls, self.started = [], []

    def start_sampling(self, num_steps):
        self.started.append((num_steps, len(self.calls)))

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return self.model(x, t, y)


class FakeModel:
    """A model whose output we control: channel c of row r = 0.1*x[r, c % 4] + label term."""

    in_channels, input_size, learn_sigma, num_classes = 4, 4, True, NUM_CLASSES

    def __call__(self, x, t, y):
        lab = (y.float() + 1.0).view(-1, 1, 1, 1)
        chans = torch.arange(1, 9, dtype=torch.float32).view(1, 8, 1, 1)
        base = torch.cat([x, x], dim=1) * 0.1 + 0.01 * lab * chans
        return torch.cat([base[:, :4], torch.tanh(base[:, 4:])], dim=1)


# --------------------------------------------------------------------------------------------
# Respacing and schedule
# --------------------------------------------------------------------------------------------


def test_respacing_50_is_rounded_even_spacing():
    kept = sorted(space_timesteps(1000, "50"))
    assert kept == [round(k * 999 / 49) for k in range(50)]
    assert kept[:4] == [0, 20, 41, 61] and kept[-1] == 999
    assert list(Diffusion(50).timestep_map) == kept


@pytest.mark.parametrize("S", [1, 2, 20, 21, 50, 250, 1000])
def test_respacing_matches_reference_loop(S):
    kept = sorted(space_timesteps(1000, str(S)))
    assert kept == ref_kept_timesteps(S)
    assert len(kept) == S and kept[0] == 0
    if S > 1:
        assert kept[-1] == 999


def test_respacing_edge_cases():
    assert sorted(space_timesteps(1000, "250")) == [round(k * 999 / 249) for k in range(250)]
    assert sorted(space_timesteps(1000, "1")) == [0]
    assert sorted(space_timesteps(1000, "1000")) == list(range(1000))
    # Accumulated float stride, not k*stride: S=21 has k*49.95 = 499.5 exactly at k=10, but the
    # running sum lands just below it, so the reference keeps 499 (not round-half-even's 500).
    kept21 = space_timesteps(1000, "21")
    assert 499 in kept21 and 500 not in kept21


def test_schedule_coefficients_match_reference():
    for S in (1, 50, 250):
        d = Diffusion(S)
        kept, steps = ref_schedule(S)
        assert list(d.timestep_map) == kept
        for name, arr in [
            ("beta", d.betas), ("acp", d.alphas_cumprod), ("acp_prev", d.alphas_cumprod_prev),
            ("sqrt_recip", d.sqrt_recip_alphas_cumprod),
            ("sqrt_recipm1", d.sqrt_recipm1_alphas_cumprod),
            ("coef1", d.posterior_mean_coef1), ("coef2", d.posterior_mean_coef2),
            ("log_var_clipped", d.posterior_log_variance_clipped), ("log_beta", d.log_betas),
        ]:
            np.testing.assert_allclose(arr, [s[name] for s in steps], rtol=1e-11, err_msg=name)
    full = Diffusion(1000)
    np.testing.assert_allclose(full.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Samplers vs reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler,S,cfg",
    [("ddim", 50, 1.5), ("ddim", 50, None), ("ddpm", 20, 1.5), ("ddpm", 20, 1.0)],
)
def test_sample_matches_reference(dit, sampler, S, cfg):
    labels = [1, 7, 3]
    got = sample(dit, labels, seed=3, num_steps=S, sampler=sampler, cfg_scale=cfg)
    want = ref_sample(dit, labels, S, sampler, seed=3, cfg_scale=cfg)
    assert got.shape == (3, 4, 8, 8)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_eps_matches_reference(dit, sampler):
    got = sample(dit, [2, 5], seed=1, num_steps=10, sampler=sampler, cfg_scale=4.0, guidance="eps")
    want = ref_sample(dit, [2, 5], 10, sampler, seed=1, cfg_scale=4.0, n_guided=4)
    torch.testing.assert_close(got, want, **TOL)
    official = sample(dit, [2, 5], seed=1, num_steps=10, sampler=sampler, cfg_scale=4.0)
    assert not torch.allclose(got, official)


def test_given_noise_is_used(dit):
    torch.manual_seed(11)
    z = torch.randn(2, 4, 8, 8)
    for sampler in ("ddim", "ddpm"):
        got = sample(dit, [0, 9], noise=z.clone(), seed=5, num_steps=5, sampler=sampler)
        want = ref_sample(dit, [0, 9], 5, sampler, seed=5, cfg_scale=1.5, noise=z.clone())
        torch.testing.assert_close(got, want, **TOL)


def test_ddim_consumes_one_randn_per_step(dit):
    sample(dit, [4], seed=7, num_steps=6, sampler="ddim", cfg_scale=1.5)
    after = torch.randn(3)
    torch.manual_seed(7)
    torch.randn(1, 4, 8, 8)
    for _ in range(6):
        torch.randn(2, 4, 8, 8)  # CFG batch: 2 rows
    assert torch.equal(after, torch.randn(3))


def test_one_step_and_long_tensor_labels(dit):
    out = sample(dit, torch.tensor([3, 4]), num_steps=1, sampler="ddpm")
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert list(Diffusion(1).timestep_map) == [0]


# --------------------------------------------------------------------------------------------
# CFG quirk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance,n_guided", [("official", 3), ("eps", 4)])
def test_guided_channels(guidance, n_guided):
    fake, s = FakeModel(), 2.5
    x = torch.randn(4, 4, 4, 4)
    y = torch.tensor([1, 6, NUM_CLASSES, NUM_CLASSES])
    t = torch.tensor([999] * 4)
    out = guided(fake, s, guidance)(x, t, y)
    raw = fake(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = raw[:2], raw[2:]
    g = uncond[:, :n_guided] + s * (cond[:, :n_guided] - uncond[:, :n_guided])
    torch.testing.assert_close(out[:2, :n_guided], g)
    torch.testing.assert_close(out[2:, :n_guided], g)
    # Unguided channels stay per branch: cond rows keep cond, uncond rows keep uncond.
    torch.testing.assert_close(out[:2, n_guided:], cond[:, n_guided:])
    torch.testing.assert_close(out[2:, n_guided:], uncond[:, n_guided:])
    if guidance == "official":  # eps channel 3 is NOT guided, and the halves disagree there
        assert not torch.allclose(out[:2, 3], out[2:, 3])
        assert not torch.allclose(out[:2, 3], uncond[:, 3] + s * (cond[:, 3] - uncond[:, 3]))
    else:
        torch.testing.assert_close(out[:2, 3], out[2:, 3])


@pytest.mark.parametrize("guidance,n_guided", [("official", 3), ("eps", 4)])
def test_fake_model_end_to_end(guidance, n_guided):
    got = sample(FakeModel(), [2, 8], seed=4, num_steps=8, sampler="ddpm", cfg_scale=3.0,
                 guidance=guidance)
    want = ref_sample(FakeModel(), [2, 8], 8, "ddpm", seed=4, cfg_scale=3.0, n_guided=n_guided)
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# Model protocol: start_sampling, call count, timesteps, labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,S,cfg", [("ddim", 12, 1.5), ("ddpm", 7, None)])
def test_model_protocol(dit, sampler, S, cfg):
    rec = Recorder(dit)
    sample(rec, [5, 6], num_steps=S, sampler=sampler, cfg_scale=cfg)
    assert rec.started == [(S, 0)]
    assert len(rec.calls) == S
    rows = 4 if cfg else 2
    kept = ref_kept_timesteps(S)
    for k, (b, t, y) in enumerate(rec.calls):
        assert b == rows
        assert t.dtype == torch.long and t.tolist() == [kept[S - 1 - k]] * rows
        assert y.tolist() == ([5, 6, NUM_CLASSES, NUM_CLASSES] if cfg else [5, 6])


def test_progress_bar(dit):
    pytest.importorskip("tqdm")
    out = sample(dit, [1], num_steps=2, progress=True)
    assert out.shape == (1, 4, 8, 8)


# --------------------------------------------------------------------------------------------
# Model dtype and host copies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_bf16_model_samples_in_float32(dit, sampler):
    """A model with bf16 weights gets its latents in bf16; the sampler and the guidance keep
    float32, so the samples are float32 and close to the float32 model's."""
    import copy

    import graphcache

    low = copy.deepcopy(dit).to(torch.bfloat16)
    seen = []
    hook = low.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        got = sample(low, [1, 7], seed=3, num_steps=6, sampler=sampler, cfg_scale=1.5)
    finally:
        hook.remove()
    want = sample(dit, [1, 7], seed=3, num_steps=6, sampler=sampler, cfg_scale=1.5)
    assert got.dtype == torch.float32 and seen == [torch.bfloat16] * 6
    assert float((got - want).norm() / want.norm()) < 0.05
    cached = graphcache.optimize(low, "fora", num_steps=6, interval=3)
    out = sample(cached, [1, 7], seed=3, num_steps=6, sampler=sampler, cfg_scale=1.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert {b.dtype for b in cached.cache.buffers()} == {torch.bfloat16}


def test_schedule_arrays_reach_the_device_once_per_run(dit, monkeypatch):
    """No host-to-device copy of the schedule per step (on CUDA each would wait for the GPU):
    the number of arrays turned into tensors does not grow with the step count."""
    made, real = [], torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: made.append(a) or real(a))
    counts = []
    for steps in (3, 12):
        made.clear()
        sample(dit, [1], seed=0, num_steps=steps, sampler="ddpm", cfg_scale=1.5)
        counts.append(len(made))
    assert counts[0] == counts[1] > 0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors(dit):
    with pytest.raises(GraphcacheError, match="ddim.*ddpm"):
        sample(dit, [1], sampler="euler")
    for bad in (0, 1001):
        with pytest.raises(GraphcacheError, match="num_steps"):
            sample(dit, [1], num_steps=bad)
    with pytest.raises(GraphcacheError, match=r"\(2, 4, 8, 8\).*\(1, 4, 8, 8\)"):
        sample(dit, [1], noise=torch.randn(2, 4, 8, 8))
    for labels in ([NUM_CLASSES], [-1], torch.tensor([0, 10])):
        with pytest.raises(GraphcacheError, match="out of range"):
            sample(dit, labels)
    for labels in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(GraphcacheError, match="no labels"):
            sample(dit, labels)
    with pytest.raises(GraphcacheError, match="guidance"):
        sample(dit, [1], guidance="all")
