"""InsertErrorCorrectionPass: exactly one factor input and one multiplication per cached branch,
none where a branch is computed (fully or on some tokens) or its block skipped; the schedule's
`corrected`, decided from the plan, names exactly the branches the pass corrects."""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.schedule import FULL, REUSE, correction_input
from eoc_setup import EOC_STEPS

BRANCHES = ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]


def corrections(gm):
    """{branch: the multiplication reading its factor input}."""
    inputs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("gc_eoc_")}
    found = {}
    for br in BRANCHES:
        node = inputs.get(correction_input(br))
        if node is not None:
            (mul,) = node.users
            assert mul.target is torch.ops.aten.mul.Tensor
            found[br] = mul
    return found


def record(cached, key):
    return next(r for r in cached.records[key] if r.name == "InsertErrorCorrectionPass")


@pytest.fixture(scope="module")
def fora(eoc_model, eoc_prior):
    return graphcache.optimize(eoc_model, "fora", EOC_STEPS, level=50, eoc=str(eoc_prior), eoc_judgment="all")


def test_fora_reuse_variant_corrects_every_branch_once(fora):
    reuse = next(k for k in fora.schedule.variants() if k[0][0] == REUSE)
    gm = fora.variants[reuse]
    found = corrections(gm)
    assert sorted(found) == BRANCHES and record(fora, reuse).counters == {"correction": 4}
    nodes = {n.name: n for n in gm.graph.nodes}
    for br in fora.structure.branches:
        mul = found[br.name]
        # the factor multiplies the cache read; the gate multiplies the corrected value, before the residual add
        assert mul.args[0].op == "get_attr" and mul.args[0].target.endswith(br.name)
        (gated,) = mul.users
        assert gated.target is torch.ops.aten.mul.Tensor and list(gated.users) == [nodes[br.residual_add]]


def test_full_variant_is_left_alone(fora):
    full = next(k for k in fora.schedule.variants() if k[0][0] == FULL)
    assert corrections(fora.variants[full]) == {}
    declined = record(fora, full).declined
    assert sorted(d.target for d in declined) == BRANCHES
    assert {d.reason for d in declined} == {"computed in this variant"}


def test_partial_and_skipped_branches_are_declined(eoc_model, eoc_prior):
    toca = graphcache.optimize(eoc_model, "duca", EOC_STEPS, interval=4, eoc=str(eoc_prior))
    reasons = {}
    for key in toca.schedule.variants():
        found = corrections(toca.variants[key])
        for d in record(toca, key).declined:
            reasons.setdefault(d.reason.split(" ")[0], set()).add(d.target)
        assert set(found) <= {"b0_attention", "b1_attention"}  # ToCa's partial steps reuse attention only
    # DuCa: partial (ToCa) steps compute some MLP tokens; aggressive steps skip the blocks
    assert reasons["partially"] == {"b0_mlp", "b1_mlp"}
    assert reasons["its"] >= {"b0_attention", "b1_attention"}  # "its block is skipped in this variant"
    assert any(corrections(toca.variants[k]) for k in toca.schedule.variants())


@pytest.mark.parametrize("method, options", [("toca", {"interval": 3}), ("clusca", {"interval": 3, "clusters": 2})])
def test_schedule_names_what_the_pass_corrects(eoc_model, eoc_prior, method, options):
    """ToCa's and ClusCa's partial steps compute the MLP on some tokens: neither the schedule nor
    the pass corrects it there (its factor input is ones), only the attention read from the cache."""
    cached = graphcache.optimize(eoc_model, method, EOC_STEPS, eoc=str(eoc_prior), eoc_lambda=1.0,
                                 eoc_judgment="all", **options)
    ones = torch.ones(16, 64)
    partial = [p for p in cached.schedule.steps if "partial" in p.kinds]
    assert partial and all(set(p.corrected) == {f"b{b}_attention" for b, k in enumerate(p.kinds) if k == "partial"}
                           for p in partial)
    for p in cached.schedule.steps:
        assert set(p.corrected) == set(corrections(cached.variants[p.variant])), f"step {p.index}"
        assert all(torch.equal(p.inputs[correction_input(br)], ones) for br in BRANCHES if br not in p.corrected)
