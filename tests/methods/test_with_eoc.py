"""EOC on the methods: FORA's caching levels; λ = 0 is the base method bit for bit; the correction
equals a literal reference written from the authors' first code (a DiT block that, on a cached
step, replaces each branch by reuse * (1 + λ (P[t] - P[t-1])) before the adaLN gate and keeps the
corrected value as the next step's reuse), run by a sampling loop written here over the plain
model, with P averaged here from the calibration runs."""

from __future__ import annotations

import types

import pytest
import torch

import graphcache
from graphcache.calibration import CALIBRATION_SEED
from graphcache.methods import get_method
from graphcache.models.dit import modulate
from graphcache.sampling import Diffusion
from eoc_setup import EOC_STEPS

LABELS = [3, 7]


def cached_indices(level, num_steps=20):
    plans = get_method("fora").schedule(num_steps, 2, {"level": level}).steps
    return [p.index for p in plans if p.kinds[0] == "reuse"]


def test_fora_levels():
    assert cached_indices(25) == [1, 3, 5, 7, 9]
    assert cached_indices(50) == list(range(1, 20, 2))
    assert cached_indices(75) == [i for i in range(20) if i % 4] and len(cached_indices(75)) == 15


def test_schedule_json_names_the_corrected_branches(eoc_prior):
    fora = get_method("fora")
    steps = fora.schedule(EOC_STEPS, 2, {"level": 50, "eoc": str(eoc_prior), "eoc_lambda": 1, "eoc_judgment": "all"},
                          16).to_json()["steps"]
    branches = ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]
    assert [s.get("corrected") for s in steps] == [None, branches] * (EOC_STEPS // 2)
    none = fora.schedule(EOC_STEPS, 2, {"level": 50, "eoc": str(eoc_prior), "eoc_lambda": 0}, 16).to_json()
    assert not any("corrected" in s for s in none["steps"])


def run(model, noise):
    return graphcache.sample(model, LABELS, noise=noise, seed=0, num_steps=EOC_STEPS, cfg_scale=None)  # seed: K-means


@pytest.fixture(scope="module")
def noise():
    return torch.randn(len(LABELS), 4, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method, options", [
    ("fora", {"level": 50}), ("toca", {"interval": 2}), ("duca", {"interval": 4}), ("taylorseer", {"interval": 2}),
    ("clusca", {"interval": 3, "clusters": 2}),
])
def test_lambda_zero_is_the_base_method(eoc_model, eoc_prior, noise, method, options):
    base = run(graphcache.optimize(eoc_model, method, EOC_STEPS, **options), noise)
    eoc = graphcache.optimize(eoc_model, method, EOC_STEPS, eoc=str(eoc_prior), eoc_lambda=0, eoc_judgment="all",
                              **options)
    assert any(p.corrected == () for p in eoc.schedule.steps)
    assert torch.equal(run(eoc, noise), base)


def branch_forwards(block, reuse, mode, step, prior, lam):
    """DiTBlock.forward with the branches recorded (mode "record"), computed and kept
    ("compute") or reused with EOC's correction ("reuse")."""

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        outs = []
        for name, norm, branch, shift, scale, gate in (("attn", self.norm1, self.attn, shift_msa, scale_msa, gate_msa),
                                                      ("mlp", self.norm2, self.mlp, shift_mlp, scale_mlp, gate_mlp)):
            t = step[0]
            if mode[0] == "reuse":
                trend = prior[(block, name)][t] - prior[(block, name)][t - 1]
                out = reuse[name] * (1 + lam * trend)
            else:
                out = branch(modulate(norm(x), shift, scale))
            reuse[name] = out
            outs.append(out)
            x = x + gate.unsqueeze(1) * out
        return x

    return forward


class Reference:
    """The plain model with EOC's block forward patched in, and its own DDIM loop."""

    def __init__(self, model):
        self.model, self.mode, self.step = model, ["compute"], [0]
        self.reuse = [{} for _ in model.blocks]
        self.prior = {}
        self.lam = 0.0

    def patch(self):
        for i, block in enumerate(self.model.blocks):
            block.forward = types.MethodType(branch_forwards(i, self.reuse[i], self.mode, self.step, self.prior,
                                                             self.lam), block)

    def unpatch(self):
        for block in self.model.blocks:
            del block.forward

    @torch.no_grad()
    def sample(self, noise, labels, cached=()):
        diffusion, x = Diffusion(EOC_STEPS), noise
        y = torch.tensor(labels)
        recorded = []
        for i, t in enumerate(range(EOC_STEPS - 1, -1, -1)):
            self.step[0] = i
            self.mode[0] = "reuse" if i in cached else "compute"
            tt = torch.full((len(labels),), t)
            out = self.model(x, diffusion.original_timesteps(tt, x), y)
            recorded.append({(b, k): v.mean(0) for b, r in enumerate(self.reuse) for k, v in r.items()})
            x = diffusion.ddim_step(out, x, tt)
        return x, recorded


@pytest.mark.parametrize("level", [50, 75])
def test_correction_equals_the_literal_reference(eoc_model, eoc_prior, noise, level):
    lam = 3000.0  # large: N(0, 0.02) weights make trends tiny, and the correction must show
    cached = set(cached_indices(level, EOC_STEPS))
    ref = Reference(eoc_model)
    ref.patch()
    try:
        # P: the calibration runs (labels 0, 1; noise from the calibration seed), uncached
        torch.manual_seed(CALIBRATION_SEED)
        _, recorded = ref.sample(torch.randn(2, 4, 8, 8), [0, 1])
        ref.prior.update({key: torch.stack([r[key] for r in recorded]) for key in recorded[0]})
        ref.lam = lam
        ref.patch()
        expected, _ = ref.sample(noise, LABELS, cached)
    finally:
        ref.unpatch()
    model = graphcache.optimize(eoc_model, "fora", EOC_STEPS, level=level, eoc=str(eoc_prior), eoc_lambda=lam,
                                eoc_judgment="all", hoist_conditioning=False)
    got = run(model, noise)
    base = run(graphcache.optimize(eoc_model, "fora", EOC_STEPS, level=level, hoist_conditioning=False), noise)
    tol = 1e-5 * float(expected.abs().max())
    assert float((got - expected).abs().max()) < tol
    assert float((base - expected).abs().max()) > 100 * tol  # the correction matters at this λ
