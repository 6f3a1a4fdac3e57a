"""DuCa compiled by graphcache vs the literal plain-PyTorch reference (toca_reference.py, duca=True).

Same harness, models and tolerances as test_toca.py (see its docstring): per-step model outputs
within 1e-5 of their scale, final latents within 1e-5 of theirs, the same RNG stream, the same
per-step kinds (full / ToCa / aggressive, mixed steps included) and fresh-token counts. Aggressive
steps skip every block and reuse the previous step's final hidden state (Shenyi-Z/DuCa `DuCa-DiT/models.py`).
"""

from __future__ import annotations

import os
import sys

import pytest

import graphcache
from graphcache.cache import CACHE_ATTR
from graphcache.methods import get_method
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_
from graphcache.ops import is_cache_write

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toca_reference import (  # noqa: E402
    check_token_wise_structure,
    compare_with_reference,
    is_toca_select,
    module_calls,
)

# Shenyi-Z/DuCa README DuCa-DiT command: fresh-ratio 0.05, ratio-scheduler ToCa, fresh-threshold 3, bonus 0.8
DDIM50 = dict(interval=3, fresh_ratio=0.05, ratio_scheduler="ToCa", soft_fresh_weight=0.25, spatial_bonus=0.8)
DDPM = dict(interval=4, fresh_ratio=0.05, ratio_scheduler="ToCa-ddpm250", soft_fresh_weight=0.25, spatial_bonus=0.8)
FINAL_STREAM = f"{CACHE_ATTR}.final_stream"

BUILT: dict = {}


@pytest.fixture(scope="module")
def dit_s():
    return init_random_(DiT(dit_config("DiT-S/2", input_size=32)), seed=0).eval()


@pytest.fixture(scope="module")
def narrow():
    return init_random_(DiT(DiTConfig(input_size=32, hidden_size=96, depth=12, num_heads=6)), seed=1).eval()


def test_defaults_are_the_readme_command():
    assert get_method("duca").resolve_options({}) == {**DDIM50, "score": "attention", "profile": "dit", "spatial_grid": 2}


@pytest.mark.parametrize(
    "model,sampler,steps,score",
    [
        ("dit_s", "ddim", 50, "attention"),  # the README command on the DiT-S/2 shape
        ("narrow", "ddim", 50, "kv-norm"),  # V-caching (v1)
        ("narrow", "ddim", 50, "random"),  # random selection (v2)
        ("narrow", "ddpm", 50, "attention"),  # T = 4: F, T, A, T
    ],
)
def test_matches_reference(request, model, sampler, steps, score):
    options = {**(DDIM50 if sampler == "ddim" else DDPM), "score": score}
    cached, metrics = compare_with_reference(request.getfixturevalue(model), "duca", steps, sampler, options)
    assert "A" in metrics["kinds"] and "T" in metrics["kinds"]
    if sampler == "ddim":  # T = 3 after a full step: aggressive first, then conservative
        assert "FAT" in metrics["kinds"]
    BUILT[(model, sampler, steps, score)] = cached


def _cached(narrow, score):
    cached = next((c for (_, s, _, sc), c in BUILT.items() if s == "ddim" and sc == score), None)
    if cached is None:  # run alone: build it
        cached = graphcache.optimize(narrow, "duca", num_steps=50, **{**DDIM50, "score": score})
    return cached


@pytest.mark.parametrize("score", ["attention", "kv-norm", "random"])
def test_structure(narrow, score):
    cached = _cached(narrow, score)
    seen = check_token_wise_structure(cached, score)  # full / partial blocks as in ToCa
    assert {"F", "T", "A"} <= seen
    for (kinds, _extra), gm in cached.variants.items():
        reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == FINAL_STREAM
                 and not all(is_cache_write(u) and u.args[0] is n for u in n.users)]
        writes = [n for n in gm.graph.nodes if is_cache_write(n) and n.args[0].target == FINAL_STREAM]
        if kinds[-1] == "skip":
            # aggressive: the last block's output is the previous step's final stream
            assert len(reads) == 1 and not writes, kinds
        else:
            assert not reads and len(writes) == 1, kinds
        if set(kinds) == {"skip"}:  # the all-aggressive variant: no block work at all
            assert not module_calls(gm, "qkv") and not module_calls(gm, "fc1")
            assert all(n.target.startswith("final_layer") for n in module_calls(gm, "adaLN_modulation.1"))
            assert not any(is_toca_select(n) for n in gm.graph.nodes)
            assert not any(is_cache_write(n) for n in gm.graph.nodes)
            assert len(module_calls(gm, "final_layer.linear")) == 1  # the final layer runs with the new t
