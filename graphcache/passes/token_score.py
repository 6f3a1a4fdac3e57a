"""ToCa-family token scoring: what full steps record, how partial steps pick and merge tokens.

Full blocks record, per block, the part of the score that only depends on the full step
(Shenyi-Z/ToCa `DiT-ToCa/cache_functions/score_evaluate.py`, `scores.py`; DuCa's V-caching is the
`kv-norm` score of Shenyi-Z/DuCa) and reset the staleness counters:

- `attention`: s1 = normalize(column sums of the head-averaged attention map). The map is computed
  explicitly (q·scale @ kᵀ, softmax, @ v) as the official code does whenever it needs it; SDPA
  gives none. Only the (B, N) column sums are kept — the (B, N, N) map itself is never cached.
- `kv-norm` (DuCa's V-caching): s1 = normalize(Σ_h (1 − ‖v_h‖)), from the values SDPA already has.
- `random`: nothing to record; partial steps draw rand(B/2, N), shared by the cond/uncond halves.
- `cross-attention` (s2 of PixArt-α ToCa, Shenyi-Z/ToCa `PixArt-alpha-ToCa`): the entropy of each
  image token's cross-attention over the text, from the explicit cross-attention map.

Each partially computed branch (the MLP; PixArt's cross-attention too) keeps its own staleness
counters and shares the block's recorded score.

Partial blocks score = s1 + λ·staleness/N (+ the spatial bonus), take the top-k per batch row,
update the staleness counters, and scatter the k fresh outputs into the cached branch output.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, update_slot, write_slot
from ..errors import GraphcacheError
from ..ops import CACHE_SCATTER, random_function
from .base import Pass, PassResult
from .token_select import SelectContext, TokenMerger, TokenSelector

SCORES = ("attention", "kv-norm", "random", "cross-attention")
# how messages name the branch kinds
_BRANCH_NAMES = {ir.ATTENTION: "attention", ir.CROSS_ATTENTION: "cross-attention", ir.MLP: "MLP",
                 ir.PARALLEL: "attention-and-MLP"}
# the branches whose attention a recorded score reads (the first such branch of a block)
SCORED_BRANCH = {"attention": (ir.ATTENTION, ir.PARALLEL), "kv-norm": (ir.ATTENTION, ir.PARALLEL),
                 "cross-attention": (ir.CROSS_ATTENTION,)}


def _stream_prefix(block: int, stream: str) -> str:
    return f"b{block}_text_" if stream == ir.TEXT else f"b{block}_"


def score_slot(block: int, stream: str = ir.IMAGE) -> str:
    return _stream_prefix(block, stream) + "score"


def staleness_slot(block: int, kind: str = ir.MLP, stream: str = ir.IMAGE) -> str:
    return _stream_prefix(block, stream) + ("staleness" if kind == ir.MLP else f"{kind}_staleness")


_SPLITS = {torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor}


def stream_scores(s1: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The score of one stream's tokens, positions start:end of a joint attention, L2-normalised
    over that stream (a two-stream block selects each stream's tokens on its own)."""
    return F.normalize(s1[:, start:end], p=2, dim=1)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Attention written out as the official ToCa code does; also returns s1's ingredients:
    the head-averaged map's column sums, L2-normalised over tokens."""
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    received = attn.mean(dim=1).sum(dim=1)
    return attn @ v, F.normalize(received, p=2, dim=1)


def cross_attention_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Cross-attention written out, and PixArt-α ToCa's s2: with m the head-averaged (B, N, L)
    map averaged 0.5/0.5 over the cond and uncond halves, H = -Σ_l m log(m + 1e-7) per image
    token and s2 = normalize(1 + H) over tokens, repeated for both halves (an odd batch: per row)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    attn = logits.softmax(dim=-1)
    m = attn.mean(dim=1)
    halves = m.shape[0] % 2 == 0
    if halves:
        # slices, not chunk: ONNX exports a chunk of the dynamic batch as a SplitToSequence that
        # onnxscript's optimizer fails on
        half = m.shape[0] // 2
        m = 0.5 * m[:half] + 0.5 * m[half:]
    entropy = -(m * torch.log(m + 1e-7)).sum(dim=-1)
    score = F.normalize(1 + entropy, p=2, dim=1)
    return attn @ v, score.repeat(2, 1) if halves else score


def value_norm_score(v: torch.Tensor) -> torch.Tensor:
    """V-caching score from (B, H, N, hd) values: normalize(Σ_h (1 − ‖v‖)) over tokens."""
    return F.normalize((1 - v.norm(dim=-1)).sum(dim=1), p=2, dim=1)


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int) -> torch.Tensor:
    """s4: on the square token grid cut into grid×grid cells, the best token of each cell gets
    `bonus × cell max` added, spreading the fresh tokens over the image."""
    b, n = score.shape
    side = int(round(n**0.5))
    cells = score.reshape(b, side // grid, grid, side // grid, grid).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(b, side // grid, side // grid, grid * grid)
    best, where = cells.max(dim=-1, keepdim=True)
    cells = cells + torch.zeros_like(cells).scatter(-1, where, bonus * best)
    cells = cells.reshape(b, side // grid, side // grid, grid, grid).permute(0, 1, 3, 2, 4)
    return cells.reshape(b, n)


@random_function
def random_scores(staleness: torch.Tensor) -> torch.Tensor:
    """The `random` score: one rand(B/2, N) draw shared by both CFG halves (rand(B, N) for an odd B)."""
    b, n = staleness.shape
    if b % 2:
        return torch.rand(b, n, device=staleness.device)
    half = torch.rand(b // 2, n, device=staleness.device)
    return torch.cat([half, half])


def toca_select(base: torch.Tensor, staleness: torch.Tensor, k: int, *, interval: int,
                soft_fresh_weight: float, bonus: float, grid: int):
    """Indices of the k highest-scoring tokens per row, and the updated staleness counters."""
    score = base + soft_fresh_weight * staleness.float() / interval
    if bonus:
        score = spatial_bonus(score, bonus, grid)
    idx = score.argsort(dim=-1, descending=True)[:, :k]
    stale = (staleness + 1).scatter(1, idx, 0)
    return idx, stale


def _sdpa_node(gm: fx.GraphModule, branch: ir.Branch) -> fx.Node | None:
    nodes = ir.nodes_by_name(gm.graph)
    return next((nodes[n] for n in branch.work if ir.is_sdpa(nodes[n])), None)


class RecordTokenScorePass(Pass):
    """In full blocks: record the block's full-step score part and zero the staleness counters of
    the branches partial steps select tokens for (`kinds`)."""

    def __init__(self, blocks, score: str, kinds=(ir.MLP,)):
        super().__init__()
        self.blocks, self.score, self.kinds = list(blocks), score, tuple(kinds)

    def call(self, gm):
        structure = ir.structure_of(gm)
        for b in self.blocks:
            branches = structure.blocks[b].branches
            selected = [br for kind in self.kinds for br in branches if br.kind == kind]
            if not selected:
                names = " or ".join(_BRANCH_NAMES[kind] for kind in self.kinds)
                self.decline(f"block {b}", f"has no {names} branch to score tokens for")
                continue
            for branch in selected:
                slot = staleness_slot(b, branch.kind, branch.stream)
                declare_slot(gm, CacheSlot(slot, like=branch.stream_in, shape=lambda s: s[:2], dtype=torch.int32))
                with ir.insert_after(ir.nodes_by_name(gm.graph)[branch.stream_in]):
                    write_slot(gm.graph, slot, gm.graph.call_function(torch.zeros_like, (read_slot(gm.graph, slot),)))
                self.count("staleness_reset", branch)
            if self.score == "random":
                continue
            scored = next((br for br in branches if br.kind in SCORED_BRANCH[self.score]), None)
            sdpa = _sdpa_node(gm, scored) if scored else None
            if sdpa is None or not 3 <= len(sdpa.args) <= 4 or sdpa.kwargs:
                self.decline(f"block {b}", f"no plain scaled_dot_product_attention(q, k, v[, mask]) in its "
                                           f"{_BRANCH_NAMES[SCORED_BRANCH[self.score][0]]} branch")
                continue
            if len(sdpa.args) == 4 and self.score == "attention":
                self.decline(f"block {b}", "its self-attention is masked: the attention-map score has no masked form")
                continue
            q, k, v = sdpa.args[:3]
            with ir.insert_after(sdpa):
                if self.score == "kv-norm":
                    out, s1 = sdpa, gm.graph.call_function(value_norm_score, (v,))
                else:
                    explicit = explicit_attention if self.score == "attention" else cross_attention_entropy
                    both = gm.graph.call_function(explicit, tuple(sdpa.args))
                    out = gm.graph.call_function(operator.getitem, (both, 0))
                    s1 = gm.graph.call_function(operator.getitem, (both, 1))
                for stream in dict.fromkeys(br.stream for br in selected):
                    first = next(br for br in selected if br.stream == stream)
                    declare_slot(gm, CacheSlot(score_slot(b, stream), like=first.stream_in, shape=lambda s: s[:2]))
                    span = _token_span(gm, branches, stream, sdpa)
                    score = gm.graph.call_function(stream_scores, (s1, *span)) if span else s1
                    write_slot(gm.graph, score_slot(b, stream), score)
                    self.count("score_record", first)
            if out is not sdpa:
                sdpa.replace_all_uses_with(out)
                gm.graph.erase_node(sdpa)
                self.counters["explicit_attention"] += 1
        return PassResult(gm, bool(self.counters))


def _token_span(gm: fx.GraphModule, branches, stream: str, sdpa: fx.Node) -> tuple[int, int] | None:
    """Where `stream`'s tokens sit among the tokens of a joint attention: the slice of the
    attention's output that leads to the stream's own attention branch output (None: the
    attention runs over the stream's tokens alone)."""
    nodes = ir.nodes_by_name(gm.graph)
    total = ir.tensor_shape(sdpa)[-2]
    own = next((br for br in branches if br.stream == stream and br.kind in SCORED_BRANCH["attention"]), None)
    if own is None or ir.tensor_shape(nodes[own.stream_in])[1] == total:
        return None
    after = ir.upstream(nodes[own.branch_out]) - ir.upstream(sdpa)
    for name in own.work:
        node = nodes[name]
        if node not in after:
            continue
        if ir.is_call(node, ir.SLICE_TARGETS) and not ir.passes_on(node):  # x[:, a:b]
            source, dim, start, end, _ = ir.slice_args(node)
            if ir.tensor_shape(source)[dim] == total:
                return start or 0, min(end, total) if end is not None else total
        if node.target is operator.getitem and ir.is_call(node.args[0], _SPLITS):  # x.split([a, b], dim)[i]
            source, sizes, dim = (*node.args[0].args, 0)[:3]
            if ir.tensor_shape(source)[dim] == total:
                if isinstance(sizes, int):
                    sizes = [min(sizes, total - start) for start in range(0, total, sizes)]
                i = node.args[1]
                return sum(sizes[:i]), sum(sizes[:i + 1])
    raise GraphcacheError(f"cannot tell where the {stream} stream's tokens sit in the joint attention "
                          f"{sdpa.name}: no slice of its output leads to {own.branch_out}")


class ToCaSelector(TokenSelector):
    """Top-k of s + λ·staleness/N (+ spatial bonus) per row; updates the branch's staleness counters."""

    def __init__(self, score: str, interval: int, soft_fresh_weight: float, bonus: float, grid: int = 2):
        self.score, self.interval = score, interval
        self.weight, self.bonus, self.grid = soft_fresh_weight, bonus, grid

    def indices(self, ctx: SelectContext) -> fx.Node:
        g, b, stream = ctx.gm.graph, ctx.branch.block, ctx.branch.stream
        n = ir.tensor_shape(ctx.stream_in)[1]
        side = int(round(n**0.5))
        if self.bonus and (side * side != n or side % self.grid):
            raise GraphcacheError(f"ToCa's spatial bonus (s4) needs a square grid of tokens divisible into "
                                  f"{self.grid}x{self.grid} cells; this model has {n} tokens (a video's frames?): "
                                  "set spatial_bonus=0")
        slot = staleness_slot(b, ctx.branch.kind, stream)
        declare_slot(ctx.gm, CacheSlot(slot, like=ctx.branch.stream_in, shape=lambda s: s[:2], dtype=torch.int32))
        staleness = read_slot(g, slot)
        if self.score == "random":
            base = g.call_function(random_scores, (staleness,))
        else:
            declare_slot(ctx.gm, CacheSlot(score_slot(b, stream), like=ctx.branch.stream_in, shape=lambda s: s[:2]))
            base = read_slot(g, score_slot(b, stream))
        both = g.call_function(
            toca_select,
            (base, staleness, ctx.tokens()),
            dict(interval=self.interval, soft_fresh_weight=self.weight, bonus=self.bonus, grid=self.grid),
        )
        write_slot(g, slot, g.call_function(operator.getitem, (both, 1)))
        return g.call_function(operator.getitem, (both, 0))


class ScatterIntoCacheMerger(TokenMerger):
    """The branch output becomes the cached output with the k fresh tokens scattered in (and the
    cache keeps them for the next steps): one in-place `cache_scatter` into the slot."""

    def merge(self, ctx: SelectContext, idx: fx.Node, fresh: fx.Node) -> fx.Node:
        declare_slot(ctx.gm, CacheSlot(ctx.branch.name, like=ctx.branch.branch_out))
        return update_slot(ctx.gm.graph, ctx.branch.name, CACHE_SCATTER, idx, fresh)
