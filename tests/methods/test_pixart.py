"""ToCa / DuCa on PixArt-α (Shenyi-Z/ToCa `PixArt-alpha-ToCa`, Shenyi-Z/DuCa `DuCa-PixArt-alpha`):
the profile's schedule against a literal re-statement of the official rules, what the passes put
in each variant of a small random diffusers PixArt-α transformer, and the two new mechanics
checked numerically against formulas written here: cross-attention computed on selected tokens
only, and the cross-attention entropy score s2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers_models import (
    DEPTH,
    dit_inputs,
    dit_transformer,
    pixart_inputs,
    pixart_transformer,
)
from graph_queries import calls

import graphcache
from graphcache import ir
from graphcache.cache import CacheState, slot_name
from graphcache.capture import call_arguments, capture_call
from graphcache.methods import get_method
from graphcache.methods.rules import kinds_string
from graphcache.ops import gather_tokens, is_cache_write
from graphcache.passes import token_score
from graphcache.passes.token_select import (
    InsertTokenSelectPass,
    TokenMerger,
    TokenSelector,
    token_locality_problem,
)
from graphcache.runtime import new_variant
from graphcache.schedule import StepPlan

PIXART_DEPTH, PIXART_TOKENS = 28, 1024  # PixArt-α at 512px: 28 blocks, a 32x32 token grid


# ---------------------------------------------------------------- the schedule
def _reference_run(S, N, fresh_ratio, duca, depth=PIXART_DEPTH, tokens=PIXART_TOKENS):
    """The official PixArt `cal_type` / `force_scheduler` / `fresh_ratio_scheduler`, restated:
    [(step, [types per layer], [mlp topk], [cross-attn topk])] in sampling order."""
    w = (0.0 if duca else 0.2) if fresh_ratio != 0 else 0.0
    cal_threshold = N
    out = []
    for s in range(S):  # the counter runs up: the first step is step 0
        types, mlp, cross = [], [], []
        for layer in range(depth):
            interval = N if s == 0 else cal_threshold
            if s % interval == 0 or s == 0:
                kind = "full"
                if layer == 0:
                    cal_threshold = int(torch.round(N / torch.tensor(1 + w - 2 * w * s / S)))
            elif not duca or (s % interval) % 2 == 1:
                kind = "ToCa"
            else:
                kind = "aggressive"
            types.append(kind)
            for factor, counts in ((1.6, mlp), (0.6, cross)):
                sw, lw = -0.9, 0.6
                ratio = fresh_ratio * (1 + lw - 2 * lw * layer / (depth - 1)) * (1 - sw + 2 * sw * s / S) * factor
                counts.append(int(torch.clamp(torch.tensor(ratio), 0, 1) * tokens) if kind == "ToCa" else None)
        out.append((s, types, mlp, cross))
    return out


_KIND = {"full": "full", "ToCa": "partial", "aggressive": "skip"}


@pytest.mark.parametrize("method,fresh_ratio,expected", [
    ("toca", 0.30, "FTMFTTFTTFTTFTTFTTMT"),  # T = 2 at the first step (3/1.2 rounds to even), 4 from step 18
    ("duca", 0.75, "FTAFTAFTAFTAFTAFTAFT"),  # weight 0: T = N = 3, odd residue conservative
])
def test_twenty_step_schedule(method, fresh_ratio, expected):
    schedule = get_method(method).schedule(20, PIXART_DEPTH, {"profile": "pixart"}, PIXART_TOKENS)
    assert schedule.options["fresh_ratio"] == fresh_ratio and schedule.options["interval"] == 3
    assert (schedule.options["spatial_bonus"], schedule.options["spatial_grid"]) == (0.4, 4)
    assert schedule.options["score"] == "cross-attention"
    reference = _reference_run(20, 3, fresh_ratio, duca=method == "duca")
    for plan, (s, types, mlp, cross) in zip(schedule.steps, reference):
        assert plan.step == s == plan.index
        assert plan.kinds == tuple(_KIND[t] for t in types), s
        assert plan.tokens == tuple(mlp) and plan.cross_tokens == tuple(cross), s
    assert kinds_string(schedule.steps) == expected
    # early steps recompute more (step factor 1.9 -> 0.1), shallow layers more (layer factor 1.6 -> 0.4)
    first_partial = schedule.steps[1]
    assert first_partial.tokens[0] == PIXART_TOKENS and first_partial.cross_tokens[-1] < PIXART_TOKENS
    assert list(first_partial.cross_tokens) == sorted(first_partial.cross_tokens, reverse=True)


@pytest.mark.parametrize("duca", [False, True])
@pytest.mark.parametrize("S", [10, 20, 50])
@pytest.mark.parametrize("N", [2, 3, 4, 5])
def test_plans_match_reference(N, S, duca):
    ratio = 0.75 if duca else 0.30
    options = {"profile": "pixart", "interval": N}
    schedule = get_method("duca" if duca else "toca").schedule(S, PIXART_DEPTH, options, PIXART_TOKENS)
    for plan, (s, types, mlp, cross) in zip(schedule.steps, _reference_run(S, N, ratio, duca)):
        assert (plan.step, plan.kinds) == (s, tuple(_KIND[t] for t in types))
        assert plan.tokens == tuple(mlp) and plan.cross_tokens == tuple(cross), s
    if duca:  # force weight 0: the interval stays N, so no step is mixed
        assert set(kinds_string(schedule.steps)) <= set("FTA")


@pytest.fixture(scope="module")
def pixart_captured():
    """(transformer, its capture on `pixart_inputs()`, the call spec): the tests rewrite copies of
    the graph (`new_variant`)."""
    transformer = pixart_transformer()
    return (transformer, *capture_call(transformer, (), pixart_inputs()))


def test_profile_follows_the_captured_structure(pixart_captured):
    pixart = ir.structure_of(pixart_captured[1])
    dit = ir.structure_of(graphcache.capture(dit_transformer(), kwargs=dit_inputs()))
    for method, ratio in (("toca", 0.30), ("duca", 0.75)):
        options = get_method(method).schedule(4, DEPTH, {}, 16, pixart).options
        assert options["profile"] == "pixart" and options["fresh_ratio"] == ratio
        options = get_method(method).schedule(4, DEPTH, {}, 16, dit).options
        assert options["profile"] == "dit" and options["score"] == "attention"
    forced = get_method("toca").resolve_options({"profile": "dit", "fresh_ratio": 0.1})
    assert forced["ratio_scheduler"] == "ToCa-ddim50" and forced["fresh_ratio"] == 0.1
    assert get_method("toca").resolve_options({"profile": "pixart", "fresh_ratio": 0.1})["fresh_ratio"] == 0.1


# ---------------------------------------------------------------- what the passes insert
@pytest.mark.parametrize("method", ["toca", "duca"])
def test_variant_structure(method):
    cached = graphcache.optimize(pixart_transformer(), method, num_steps=6, kwargs=pixart_inputs())
    seen = set()
    for (kinds, _), gm in cached.variants.items():
        seen.add(kinds_string([StepPlan(0, 0, kinds)]))
        full, partial = kinds.count("full"), kinds.count("partial")
        read = {slot_name(n) for n in gm.graph.nodes if slot_name(n) and not all(is_cache_write(u) for u in n.users)}
        entropy = calls(gm, token_score.cross_attention_entropy)
        selects = [n for n in gm.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "__wrapped__", n.target) is token_score.toca_select]
        gathered = [n.args[0].name for n in calls(gm, gather_tokens)]  # the streams they gather from
        sdpa = calls(gm, torch.ops.aten.scaled_dot_product_attention.default)
        assert len(entropy) == full, kinds  # s2 recorded by every full block, from its cross-attention
        assert len(selects) == 2 * partial, kinds  # cross-attention and MLP tokens, each block
        structure = ir.structure_of(gm)
        assert sorted(gathered) == sorted(structure.branch(b, kind).stream_in for b, k in enumerate(kinds)
                                          if k == "partial" for kind in (ir.CROSS_ATTENTION, ir.MLP)), kinds
        # self-attention: SDPA in full blocks, the cache in partial ones; cross-attention: written
        # out in full blocks (for its map), SDPA on the gathered queries in partial ones
        assert {f"b{b}_attention" for b, k in enumerate(kinds) if k == "partial"} <= read, kinds
        assert not {f"b{b}_attention" for b, k in enumerate(kinds) if k == "full"} & read, kinds
        assert len(sdpa) == full + partial, kinds
    assert {"F", "T"} <= seen and (method == "toca" or "A" in seen)
    with torch.no_grad():
        outs = [cached(**pixart_inputs(seed=i)).sample for i in range(6)]
    assert all(torch.isfinite(o).all() for o in outs)


# ---------------------------------------------------------------- numerics
def _attn2_inputs(transformer, inputs):
    """What block 0's cross-attention module receives in a forward: (stream, text, mask)."""
    got = {}

    def hook(module, args, kwargs):
        got.update(x=args[0] if args else kwargs["hidden_states"], text=kwargs["encoder_hidden_states"],
                   mask=kwargs.get("attention_mask"))

    handle = transformer.transformer_blocks[0].attn2.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        transformer(**inputs)
    handle.remove()
    return got


def _maps(attn, x, text):
    """Per-head softmax maps (B, H, N, L) and the module's output, written from the formulas."""
    b, n, c = x.shape
    h = attn.heads
    q = F.linear(x, attn.to_q.weight, attn.to_q.bias).view(b, n, h, c // h).transpose(1, 2)
    k = F.linear(text, attn.to_k.weight, attn.to_k.bias).view(b, -1, h, c // h).transpose(1, 2)
    v = F.linear(text, attn.to_v.weight, attn.to_v.bias).view(b, -1, h, c // h).transpose(1, 2)
    maps = torch.softmax(q @ k.transpose(-1, -2) / (c // h) ** 0.5, dim=-1)
    out = (maps @ v).transpose(1, 2).reshape(b, n, c)
    return maps, F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


SELECTED = torch.tensor([[3, 0, 9, 15], [7, 2, 11, 5]])


class FixedSelector(TokenSelector):
    def indices(self, ctx):
        return ctx.gm.graph.call_function(_selected, (ctx.stream_in,))


def _selected(stream):
    return SELECTED


FRESH: list[torch.Tensor] = []  # what RecordFresh's merge saw, call by call


class RecordFresh(TokenMerger):
    """Keeps the k fresh rows for the test; the branch output is the full one with them scattered in."""

    def merge(self, ctx, idx, fresh):
        return ctx.gm.graph.call_function(_record_scatter, (ctx.branch_out, idx, fresh))


def _record_scatter(full, idx, fresh):
    FRESH.append(fresh)
    return full.scatter(1, idx[..., None].expand(-1, -1, full.shape[-1]), fresh)


def test_cross_attention_on_selected_tokens_equals_full_rows(pixart_captured):
    transformer, captured, spec = pixart_captured
    inputs = pixart_inputs()
    gm = new_variant(captured, CacheState())
    select = InsertTokenSelectPass([0], FixedSelector(), RecordFresh(), kind=ir.CROSS_ATTENTION)
    assert select(gm).modified and not select.declined
    gm.recompile()
    FRESH.clear()
    with torch.no_grad():
        out = gm(*spec.flatten(call_arguments(transformer, (), inputs)))
    fresh = FRESH[0]
    assert fresh.shape == (2, SELECTED.shape[1], 32)  # the SDPA ran on 4 queries, not 16
    got = _attn2_inputs(transformer, inputs)
    _, reference = _maps(transformer.transformer_blocks[0].attn2, got["x"], got["text"])
    torch.testing.assert_close(fresh, reference.gather(1, SELECTED[..., None].expand(-1, -1, 32)),
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out, transformer(**inputs).sample, rtol=1e-5, atol=1e-6)


def test_cross_attention_entropy_score_matches_explicit_maps():
    transformer = pixart_transformer()
    inputs = pixart_inputs(batch=4)  # two images: rows 0-1 and their uncond rows 2-3
    cached = graphcache.optimize(transformer, "toca", num_steps=4, kwargs=inputs)
    with torch.no_grad():
        cached(**inputs)  # the first step: full, records s2
    got = _attn2_inputs(transformer, inputs)
    maps, _ = _maps(transformer.transformer_blocks[0].attn2, got["x"], got["text"])
    m = maps.mean(dim=1)  # head-averaged (B, N, L)
    m = 0.5 * m[:2] + 0.5 * m[2:]  # cond and uncond halves
    entropy = -(m * torch.log(m + 1e-7)).sum(dim=-1)
    reference = torch.cat([F.normalize(1 + entropy, p=2, dim=1)] * 2)
    torch.testing.assert_close(cached.cache.b0_score, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- declines
def _cross_attention_variant(captured):
    gm = new_variant(captured, CacheState())
    branch = ir.structure_of(gm).branch(0, ir.CROSS_ATTENTION)
    nodes = ir.nodes_by_name(gm.graph)
    sdpa = next(nodes[n] for n in branch.work if ir.is_sdpa(nodes[n]))
    return gm, branch, nodes, sdpa


def test_cross_attention_with_image_keys_is_declined(pixart_captured):
    gm, branch, _, sdpa = _cross_attention_variant(pixart_captured[1])
    assert token_locality_problem(gm, branch) is None  # control: the text keys keep it local
    q = sdpa.args[0]
    sdpa.args = (q, q, *sdpa.args[2:])  # keys from the image stream: self-attention in disguise
    problem = token_locality_problem(gm, branch)
    assert problem and problem.startswith(f"node {sdpa.name} ") and "image stream" in problem
    select = InsertTokenSelectPass([0], FixedSelector(), RecordFresh(), kind=ir.CROSS_ATTENTION)
    assert not select(gm).modified and [d.target for d in select.declined] == [branch.name]


def test_baked_token_count_becomes_the_selected_count(pixart_captured):
    """A static capture bakes the token count into a view: the copy on the selected tokens takes
    their count instead, and still computes the full rows."""
    transformer, captured, spec = pixart_captured
    inputs = pixart_inputs()
    gm, branch, nodes, _ = _cross_attention_variant(captured)
    view = next(nodes[n] for n in branch.work if nodes[n].target == torch.ops.aten.view.default)
    batch, _, heads, width = view.args[1]
    view.args = (view.args[0], [batch, 16, heads, width])  # what a static-shape capture would hold
    assert token_locality_problem(gm, branch) is None
    select = InsertTokenSelectPass([0], FixedSelector(), RecordFresh(), kind=ir.CROSS_ATTENTION)
    assert select(gm).modified and not select.declined
    copy = next(n for n in gm.graph.nodes if n.meta.get(ir.ON_SELECTED_TOKENS) and n.target == view.target
                and ir.layer_path(n) == ir.layer_path(view))
    count = copy.args[1][1]
    assert count.target == ir.SYM_SIZE and count.args == (calls(gm, gather_tokens)[0], 1)
    gm.recompile()
    FRESH.clear()
    with torch.no_grad():
        out = gm(*spec.flatten(call_arguments(transformer, (), inputs)))
        torch.testing.assert_close(out, transformer(**inputs).sample, rtol=1e-5, atol=1e-6)
    assert FRESH[0].shape == (2, SELECTED.shape[1], 32)