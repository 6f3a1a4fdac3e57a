"""ToCa compiled by graphcache vs a literal plain-PyTorch reference (toca_reference.py).

Both sides sample with `graphcache.sample` (same seed, CFG 1.5, official 3-channel guidance) from
the same randomly initialised DiT (`init_random_`: every weight N(0, 0.02), gates included).

Tolerances (toca_reference.OUT_TOL / LATENT_TOL), and why the per-step outputs are compared too:
with random weights the model's eps is small next to the unit noise, so the final DDIM latents are
dominated by the initial noise amplified by 1/sqrt(alpha_bar_T) (~150x). A ToCa detail such as the
spatial bonus moves the final latents by only ~5e-7 of their scale, but each step's model output
by ~3e-4 of ITS scale (see test_comparison_is_sensitive). So every step's model output must agree
within 1e-5 of the output scale, and the final latents within 1e-5 of theirs. On CPU both sides
run the same kernels in the same order and agree bit for bit in every case here.

Models: the real DiT-S/2 shape (hidden 384, depth 12, 6 heads, 32x32 latent -> 256 tokens on a
16x16 grid, so the ToCa-ddim50 token counts and the 2x2 bonus cells are the real ones), the same
geometry at width 96 ("narrow", for the option sweep: identical token counts and grid, ~15x
cheaper), and one short DiT-XL/2 run (hidden 1152, depth 28, 16 heads) at a 16x16 latent (64
tokens), DDIM-10: at a 32x32 latent an XL forward is too slow for a CPU test run. Its weights are
drawn uniformly with the same std (test_clusca.random_xl): 675M normal draws were a large part of
its time.

Threads: the module runs torch single-threaded (restored afterwards). On the shared 2-core
machine intra-op threads oversubscribe, and for ops this small the hand-off between threads costs
more than the second thread saves.
"""

from __future__ import annotations

import os
import sys

import pytest

import graphcache
from graphcache.methods import get_method
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_clusca import random_xl  # noqa: E402
from toca_reference import (  # noqa: E402
    OUT_TOL,
    ReferenceToCa,
    check_token_wise_structure,
    compare_with_reference,
    max_rel,
    sample_recorded,
)

DDIM50 = dict(interval=3, fresh_ratio=0.07, ratio_scheduler="ToCa-ddim50", soft_fresh_weight=0.25, spatial_bonus=0.6)
DDPM = dict(interval=4, fresh_ratio=0.07, ratio_scheduler="ToCa-ddpm250", soft_fresh_weight=0.25, spatial_bonus=0.6)

BUILT: dict = {}

try:  # CI installs the dev extras: give the one expensive test a generous hang guard, never a skip
    import pytest_timeout  # noqa: F401

    xl_guard = pytest.mark.timeout(1800)  # a hang guard, not a speed limit: minutes under a loaded 2-core run
except ImportError:
    def xl_guard(test):
        return test  # (model, sampler, steps, score) -> CachedModel, reused by the structural test


@pytest.fixture(scope="module")
def dit_s():
    return init_random_(DiT(dit_config("DiT-S/2", input_size=32)), seed=0).eval()


@pytest.fixture(scope="module")
def narrow():
    return init_random_(DiT(DiTConfig(input_size=32, hidden_size=96, depth=12, num_heads=6)), seed=1).eval()


def test_defaults_are_the_readme_ddim50_command():
    opts = get_method("toca").resolve_options({})
    assert opts == {**DDIM50, "score": "attention", "profile": "dit", "spatial_grid": 2}


@pytest.mark.parametrize(
    "model,sampler,steps,score",
    [
        ("dit_s", "ddim", 50, "attention"),  # the README DDIM-50 command on the DiT-S/2 shape
        ("narrow", "ddim", 50, "kv-norm"),
        ("narrow", "ddim", 50, "random"),
        ("narrow", "ddpm", 50, "random"),  # rand per partial layer interleaved with DDPM's randn
    ],
)
def test_matches_reference(request, model, sampler, steps, score):
    options = {**(DDIM50 if sampler == "ddim" else DDPM), "score": score}
    cached, metrics = compare_with_reference(request.getfixturevalue(model), "toca", steps, sampler, options)
    if sampler == "ddim" and steps == 50:  # the official scheduler's DDIM-50 N=3 shape, derived on both sides
        assert metrics["kinds"] == "FTTTMFTTTFTTTFTTTMTFTTFTTFTTFTTFTFTFTFTFTFTFTFTFTF"
    assert any(k for p in cached.schedule.steps for k in (p.tokens or ()) if k), "no partial step computed a token"
    BUILT[(model, sampler, steps, score)] = cached


@xl_guard
def test_dit_xl_shape_short_run():
    """DiT-XL/2 shape (depth 28: the official layer factor divides by 27 literally). Deliberately
    not marked slow: it runs in CI (DDIM-10 at a 16x16 latent keeps it short, see the module
    docstring)."""
    dit = random_xl(input_size=16, num_classes=1000, seed=0)
    cached, metrics = compare_with_reference(dit, "toca", 10, "ddim", {**DDIM50, "score": "attention"},
                                             layer_divisor=27)
    assert set(metrics["kinds"]) >= {"F", "T", "M"}


def test_zero_fresh_ratio_is_fora(narrow):
    """ToCa with fresh_ratio=0 (T = N, 0 tokens) equals FORA with the same interval."""
    S, N = 50, 3
    toca = graphcache.optimize(narrow, "toca", num_steps=S, **{**DDIM50, "fresh_ratio": 0.0, "score": "attention"})
    fora = graphcache.optimize(narrow, "fora", num_steps=S, interval=N)
    for t, f in zip(toca.schedule.steps, fora.schedule.steps):
        assert len(set(t.kinds)) == 1 and len(set(f.kinds)) == 1, (t.step, t.kinds)  # no mixed steps
        assert (t.kinds[0] == "full") == (f.kinds[0] == "full"), t.step  # the same full steps
        assert all(k == 0 for k in t.tokens if k is not None)  # partial steps compute no token
    lat_t, out_t, *_ = sample_recorded(toca, S, "ddim")
    lat_f, out_f, *_ = sample_recorded(fora, S, "ddim")
    # the full steps differ only in the attention kernel (explicit in ToCa, SDPA in FORA)
    print(f"\ntoca(fresh_ratio=0) vs fora: outputs {max_rel(out_t, out_f):.3g}, latents {max_rel(lat_t, lat_f):.3g}")
    assert max_rel(out_t, out_f) <= OUT_TOL
    assert max_rel(lat_t, lat_f) <= OUT_TOL


def test_comparison_is_sensitive(narrow):
    """Plausible ToCa mistakes move the per-step outputs by far more than OUT_TOL."""
    S = 20
    base = dict(interval=3, fresh_ratio=0.07, ratio_scheduler="ToCa-ddim50", score="attention",
                soft_fresh_weight=0.25, bonus=0.6)
    _, out, *_ = sample_recorded(ReferenceToCa(narrow, S, **base), S, "ddim")
    for change in (dict(bonus=0.0), dict(soft_fresh_weight=0.0), dict(score="kv-norm")):
        _, other, *_ = sample_recorded(ReferenceToCa(narrow, S, **{**base, **change}), S, "ddim")
        assert max_rel(other, out) > 10 * OUT_TOL, change


@pytest.mark.parametrize("score", ["attention", "kv-norm", "random"])
def test_structure(narrow, score):
    cached = next((c for (_, _, _, s), c in BUILT.items() if s == score), None)
    if cached is None:  # run alone: build it
        cached = graphcache.optimize(narrow, "toca", num_steps=50, **{**DDIM50, "score": score})
    seen = check_token_wise_structure(cached, score)
    assert {"F", "T", "M"} <= seen


# --------------------------------------------------------------------------------------------
# The FLUX profile (ToCa's FLUX code, METHODS.md §3.7), planned without a model: FLUX.1-dev's 19
# double-stream and 38 single-stream blocks, 4096 image and 512 text tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [4, 5])
def test_flux_schedule_follows_its_rule(interval):
    """The counter runs up; the first 3 steps are full, then every N-th counting from the third."""
    sched = get_method("toca").schedule(50, options={"profile": "flux", "interval": interval})
    assert sched.depth == 19 + 38 and all(len(set(p.kinds)) == 1 for p in sched.steps)
    full = [p.kinds[0] == "full" for p in sched.steps]
    assert full == [i in (0, 1, 2) or (i - 2) % interval == 0 for i in range(50)]
    assert [p.step for p in sched.steps] == list(range(50))
    if interval == 4:  # the default: 3 full steps, then one in 4 from step 2 on
        assert "".join("F" if f else "T" for f in full) == "FFF" + "TTTF" * 11 + "TTT"
    assert all(p.tokens is None and p.text_tokens is None and p.joint_tokens is None
               for p, f in zip(sched.steps, full) if f)


def test_flux_fresh_tokens_by_stream_and_layer():
    """fresh_ratio 0.1 x stream factor (double 0.4, single 1.6) x layer factor (1.5 at a block
    type's first block, 0.5 at its last), times the stream's tokens, truncated: written out."""
    sched = get_method("toca").schedule(50, options={"profile": "flux"})
    assert sched.options["fresh_ratio"] == 0.1 and sched.options["interval"] == 4
    assert sched.options["spatial_bonus"] == 0.0  # text and joint tokens form no grid
    partial = sched.steps[3]
    double, single = range(19), range(19, 57)
    assert partial.tokens[0] == 245 and partial.text_tokens[0] == 30  # 0.06 x 4096, 0.06 x 512
    assert partial.tokens[18] == 81 and partial.text_tokens[18] == 10  # 0.02 x ...
    assert partial.joint_tokens[19] == 1105 and partial.joint_tokens[56] == 368  # 0.24, 0.08 x 4608
    assert all(partial.joint_tokens[b] is None for b in double)
    assert all(partial.tokens[b] is None and partial.text_tokens[b] is None for b in single)
    # the layer factor falls linearly within each block type
    image = [partial.tokens[b] for b in double]
    assert image == sorted(image, reverse=True) and image[9] == int(0.1 * 0.4 * 1.0 * 4096)
    assert all(p.tokens == partial.tokens for p in sched.steps if p.kinds[0] == "partial")
