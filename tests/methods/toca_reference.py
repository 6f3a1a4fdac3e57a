"""A plain-PyTorch reference of ToCa and DuCa on the DiT, written literally after the official DiT
code (Shenyi-Z/ToCa `DiT-ToCa/`, arXiv 2410.05317; Shenyi-Z/DuCa `DuCa-DiT/`, arXiv 2412.18911).

Helper module for tests/methods/test_toca.py and test_duca.py (not collected: no `test_` prefix).
It shares NOTHING with graphcache's passes, schedule or rules: it keeps a `cache_dic` / `current`
pair like the official code (`cache_functions/cache_init.py`), decides `cal_type` per block before
the block runs (`cal_type.py`), calls `force_scheduler` from `force_init` in a full block (ToCa:
layer 0 only; DuCa: every full block), evaluates the fresh-ratio scheduler per (step, layer, module)
(`fresh_ratio_scheduler.py`), scores and cuts tokens (`score_evaluate.py`, `scores.py`,
`cache_cutfresh.py`; DuCa's `kv-norm` score) and runs the full / partial / aggressive blocks
(`models.py`) from the DiT's own submodules in the forward order of facebookresearch/DiT
`models.py`.

The one documented generalisation (shared with graphcache, identical on DiT-XL/2): the official
layer factor divides by 27, i.e. `depth - 1` of DiT-XL/2; here it divides by `depth - 1` of the
wrapped model, so shallower test models span the same layer-factor range. Pass `layer_divisor=27`
to get the official constant on any depth.

What it records for the tests: `log`, one entry per model call, `(step, types, topks)` with the
per-layer type ('full' / 'ToCa' / 'aggressive') and the MLP top-k of each 'ToCa' layer (None
elsewhere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# fresh_ratio_scheduler.py: name -> (step weight sw, layer weight lw). DuCa's 'ToCa' == ToCa-ddim50.
_TOCA_SCHEDULERS = {"ToCa-ddim50": (2.0, -0.2), "ToCa-ddpm250": (0.4, 0.8)}
_DUCA_SCHEDULERS = {**_TOCA_SCHEDULERS, "ToCa": (2.0, -0.2)}


def modulate(x, shift, scale):
    # DiT's modulate: norm(x) * (1 + scale[:, None]) + shift[:, None]
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------- cache_init.py
def cache_init(num_steps, depth, *, fresh_threshold, fresh_ratio, ratio_scheduler, cache_type,
               soft_fresh_weight, bonus, grid, duca):
    cache_dic = {
        "cache": {-1: {layer: {} for layer in range(depth)}},
        "attn_map": {-1: {}},
        "cache_index": {-1: {layer: {} for layer in range(depth)}},
        "fresh_threshold": fresh_threshold,
        "fresh_ratio": fresh_ratio,
        "cal_threshold": fresh_threshold,
        "ratio_scheduler": ratio_scheduler,
        "cache_type": cache_type,
        "soft_fresh_weight": soft_fresh_weight,
        "bonus": bonus,
        "grid": grid,
        "duca": duca,
    }
    current = {"num_steps": num_steps, "step": None, "layer": None, "module": None, "type": None}
    return cache_dic, current


# ------------------------------------------------------------------------- cal_type.py (ToCa / DuCa)
def cal_type(cache_dic, current):
    s, S = current["step"], current["num_steps"]
    first_step = s == S - 1
    interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    if s % interval == 0 or first_step:
        current["type"] = "full"
    elif not cache_dic["duca"]:
        current["type"] = "ToCa"  # ToCa: the (s % interval) % 2 branch is also 'ToCa'
    elif (s % interval) % 2 == 1:
        current["type"] = "ToCa"  # DuCa conservative
    else:
        current["type"] = "aggressive"  # DuCa: even nonzero residue


def force_scheduler(cache_dic, current):
    s, S = current["step"], current["num_steps"]
    w = 0.4 if cache_dic["fresh_ratio"] != 0 else 0.0
    step_factor = torch.tensor(1 + w - 2 * w * s / S, dtype=torch.float32)
    threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)  # float32, half-to-even
    if cache_dic["fresh_ratio"] != 0 and s in range(int(0.2 * S), int(0.4 * S)):
        threshold = torch.tensor(2.0)
    cache_dic["cal_threshold"] = int(threshold.item())


def force_init(cache_dic, current, batch, tokens):
    """Full block: zero the module's staleness counter; ToCa reschedules only at layer 0, DuCa at
    every full block (same effect within a step)."""
    layer, module = current["layer"], current["module"]
    cache_dic["cache_index"][-1][layer][module] = torch.zeros(batch, tokens, dtype=torch.int32)
    if cache_dic["duca"] or layer == 0:
        force_scheduler(cache_dic, current)


# ------------------------------------------------------------------------- fresh_ratio_scheduler.py
def fresh_ratio_scheduler(cache_dic, current, layer_divisor):
    schedulers = _DUCA_SCHEDULERS if cache_dic["duca"] else _TOCA_SCHEDULERS
    sw, lw = schedulers[cache_dic["ratio_scheduler"]]  # KeyError for ToCa's 'ToCa' (official raises)
    s, S, layer = current["step"], current["num_steps"], current["layer"]
    step_factor = 1 + sw - 2 * sw * s / S
    layer_factor = 1 + lw - 2 * lw * layer / layer_divisor
    if current["module"] == "attn":
        module_factor = 1 - (1 - 0.6) * 2.5
    else:
        module_factor = 1 + 0.6 * 2.5
    ratio = cache_dic["fresh_ratio"] * layer_factor * step_factor * module_factor
    return torch.clamp(torch.tensor(ratio, dtype=torch.float32), 0, 1)


# ------------------------------------------------------------------------- scores.py, score_evaluate.py
def local_selection_with_bonus(score, bonus, grid):
    """s4, written independently of graphcache: max-pool the (side x side) score map in grid x grid
    cells, and add bonus x cell-max to each cell's argmax token."""
    b, n = score.shape
    side = math.isqrt(n)
    best, where = F.max_pool2d(score.view(b, 1, side, side), kernel_size=grid, stride=grid, return_indices=True)
    extra = torch.zeros_like(score).scatter_(1, where.view(b, -1), bonus * best.view(b, -1))
    return score + extra


def score_evaluate(cache_dic, current, batch, tokens):
    layer = current["layer"]
    cache_type = cache_dic["cache_type"]
    if cache_type == "attention":
        attn_map = cache_dic["attn_map"][-1][layer]  # (B, N, N), recorded in the last full step
        s1 = F.normalize(attn_map.sum(dim=1), p=2, dim=1)
    elif cache_type == "kv-norm":
        v_norm = cache_dic["cache"][-1][layer]["v_norm"]  # (B, H, N)
        s1 = F.normalize((1 - v_norm).sum(dim=1), p=2, dim=1)
    elif cache_type == "random":
        half = torch.rand(batch // 2, tokens)
        s1 = torch.cat([half, half], dim=0)
    else:
        raise ValueError(cache_type)
    cnt = cache_dic["cache_index"][-1][layer]["mlp"]
    score = s1 + cache_dic["soft_fresh_weight"] * cnt.float() / cache_dic["fresh_threshold"]
    if cache_dic["bonus"]:
        score = local_selection_with_bonus(score, cache_dic["bonus"], cache_dic["grid"])
    return score


def cache_cutfresh(cache_dic, current, x, topk):
    """(idx, fresh tokens of x); updates the MLP staleness counter in place."""
    b, n, c = x.shape
    score = score_evaluate(cache_dic, current, b, n)
    idx = score.argsort(dim=-1, descending=True)[:, :topk]
    cnt = cache_dic["cache_index"][-1][current["layer"]]["mlp"]
    cnt += 1
    cnt.scatter_(1, idx, 0)
    fresh = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, c))
    return idx, fresh


# --------------------------------------------------------------------------------- the model
class ReferenceToCa:
    """`model(x, t, y)` for graphcache.sample: ToCa (or DuCa with duca=True) over `dit`'s modules."""

    def __init__(self, dit, num_steps, interval=3, fresh_ratio=0.07, ratio_scheduler="ToCa-ddim50",
                 score="attention", soft_fresh_weight=0.25, bonus=0.6, duca=False, grid=2,
                 layer_divisor=None):
        self.dit = dit.eval()
        self.num_steps = num_steps
        self.interval, self.fresh_ratio, self.ratio_scheduler = interval, fresh_ratio, ratio_scheduler
        self.score, self.soft_fresh_weight, self.bonus, self.grid = score, soft_fresh_weight, bonus, grid
        self.duca = duca
        self.depth = len(dit.blocks)
        self.layer_divisor = layer_divisor if layer_divisor is not None else max(self.depth - 1, 1)
        for attr in ("in_channels", "input_size", "learn_sigma", "num_classes", "out_channels", "patch_size"):
            setattr(self, attr, getattr(dit, attr))
        self.log = []
        self.start_sampling(num_steps)

    def start_sampling(self, num_steps):
        assert num_steps == self.num_steps, (num_steps, self.num_steps)
        self.cache_dic, self.current = cache_init(
            num_steps, self.depth, fresh_threshold=self.interval, fresh_ratio=self.fresh_ratio,
            ratio_scheduler=self.ratio_scheduler, cache_type=self.score,
            soft_fresh_weight=self.soft_fresh_weight, bonus=self.bonus, grid=self.grid, duca=self.duca)
        self.calls = 0
        self.log = []

    # ---- attention of a full block: explicit when the score needs the map (as `cache_functions/attention.py`), else SDPA
    def _attention(self, attn, h):
        b, n, c = h.shape
        heads = attn.num_heads
        qkv = attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_map = v_norm = None
        if self.score == "attention":
            scale = (c // heads) ** -0.5
            q = q * scale
            a = q @ k.transpose(-2, -1)
            a = a.softmax(dim=-1)
            o = a @ v
            attn_map = a.mean(dim=1)  # (B, N, N), averaged over heads
        else:
            o = F.scaled_dot_product_attention(q, k, v)
            if self.score == "kv-norm":
                v_norm = v.norm(dim=-1)  # (B, H, N): ||v||_2 over head_dim, per head (DuCa's V-caching)
        out = attn.proj(o.transpose(1, 2).reshape(b, n, c))
        return out, attn_map, v_norm

    def _full_block(self, block, x, c):
        cache_dic, current = self.cache_dic, self.current
        layer = current["layer"]
        b, n, _ = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        current["module"] = "attn"
        out, attn_map, v_norm = self._attention(block.attn, modulate(block.norm1(x), shift_msa, scale_msa))
        cache_dic["cache"][-1][layer]["attn"] = out
        if attn_map is not None:
            cache_dic["attn_map"][-1][layer] = attn_map
        if v_norm is not None:
            cache_dic["cache"][-1][layer]["v_norm"] = v_norm
        force_init(cache_dic, current, b, n)
        x = x + gate_msa.unsqueeze(1) * out
        current["module"] = "mlp"
        mlp_out = block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
        cache_dic["cache"][-1][layer]["mlp"] = mlp_out
        force_init(cache_dic, current, b, n)
        x = x + gate_mlp.unsqueeze(1) * mlp_out
        return x

    def _partial_block(self, block, x, c):
        cache_dic, current = self.cache_dic, self.current
        layer = current["layer"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        cache = cache_dic["cache"][-1][layer]
        x = x + gate_msa.unsqueeze(1) * cache["attn"]  # attention entirely from cache, CURRENT gate
        current["module"] = "mlp"
        topk = int(fresh_ratio_scheduler(cache_dic, current, self.layer_divisor) * x.shape[1])
        idx, fresh = cache_cutfresh(cache_dic, current, x, topk)
        y = block.mlp(modulate(block.norm2(fresh), shift_mlp, scale_mlp))  # (B, topk, C)
        cache["mlp"].scatter_(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        x = x + gate_mlp.unsqueeze(1) * cache["mlp"]
        return x, topk

    @torch.no_grad()
    def __call__(self, x, t, y):
        dit, cache_dic, current = self.dit, self.cache_dic, self.current
        current["step"] = self.num_steps - 1 - self.calls  # descending, like the official loops
        height, width = x.shape[2], x.shape[3]
        x = dit.x_embedder(x) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y)
        types, topks = [], []
        last = self.depth - 1
        for layer, block in enumerate(dit.blocks):
            current["layer"] = layer
            cal_type(cache_dic, current)
            kind = current["type"]
            topk = None
            if kind == "full":
                x = self._full_block(block, x, c)
            elif kind == "ToCa":
                x, topk = self._partial_block(block, x, c)
            else:  # DuCa 'aggressive': no computation; the last layer takes the cached final stream
                if layer == last:
                    x = cache_dic["cache"][-1]["noise"]
            if layer == last and kind != "aggressive":
                cache_dic["cache"][-1]["noise"] = x
            types.append(kind)
            topks.append(topk)
        x = dit.final_layer(x, c)
        x = dit.unpatchify(x, height, width)
        self.log.append((current["step"], tuple(types), tuple(topks)))
        self.calls += 1
        return x


# --------------------------------------------------------------------------------- test helpers
class Recorder:
    """Wraps a model for graphcache.sample and keeps a copy of every model output (per step).

    `marks` (optional list): its length is recorded after every step, so a list another hook
    appends to can be cut into per-step slices."""

    def __init__(self, model, marks=None):
        self.model, self.marks = model, marks
        self.outputs, self.cuts = [], []
        for attr in ("in_channels", "input_size", "learn_sigma", "num_classes"):
            setattr(self, attr, getattr(model, attr))

    def start_sampling(self, num_steps):
        self.outputs, self.cuts = [], []
        start = getattr(self.model, "start_sampling", None)
        if callable(start):
            start(num_steps)

    def __call__(self, x, t, y):
        out = self.model(x, t, y)
        self.outputs.append(out.detach().clone())
        if self.marks is not None:
            self.cuts.append(len(self.marks))
        return out

    def per_step(self, values):
        """`values` (the `marks` list) cut at the recorded step boundaries."""
        bounds = [0, *self.cuts]
        return [values[a:b] for a, b in zip(bounds, bounds[1:])]


# --------------------------------------------------------------------------------- test harness
# Everything below drives graphcache for the tests; the reference above never imports it.
KIND_OF_TYPE = {"full": "full", "ToCa": "partial", "aggressive": "skip"}  # == graphcache.schedule kinds


def optimize_recording(dit, method, num_steps, **options):
    """graphcache.optimize, with every token select it compiles recording how many tokens it
    actually selected (the width of its index tensor) into the returned list, in call order."""
    import graphcache
    from graphcache.passes import token_score

    used = []
    original = token_score.toca_select

    def recording_select(base, staleness, k, **kwargs):
        idx, stale = original(base, staleness, k, **kwargs)
        used.append(int(idx.shape[1]))
        return idx, stale

    recording_select.__wrapped__ = original
    token_score.toca_select = recording_select  # the pass reads the module global when it inserts nodes
    try:
        cached = graphcache.optimize(dit, method, num_steps=num_steps, **options)
    finally:
        token_score.toca_select = original
    return cached, used


def reference_kwargs(options, duca):
    """graphcache option names -> ReferenceToCa keyword arguments."""
    return dict(interval=options["interval"], fresh_ratio=options["fresh_ratio"],
                ratio_scheduler=options["ratio_scheduler"], score=options["score"],
                soft_fresh_weight=options["soft_fresh_weight"], bonus=options["spatial_bonus"], duca=duca)


def sample_recorded(model, num_steps, sampler, marks=None, labels=(207,), seed=0, cfg_scale=1.5):
    """(latents, per-step model outputs (S, 2B, C, H, W), RNG state after the run, recorder, seconds)."""
    import time

    import graphcache

    rec = Recorder(model, marks)
    t0 = time.perf_counter()
    latents = graphcache.sample(rec, list(labels), seed=seed, num_steps=num_steps, sampler=sampler,
                                cfg_scale=cfg_scale)
    seconds = time.perf_counter() - t0
    return latents, torch.stack(rec.outputs), torch.get_rng_state(), rec, seconds


def max_rel(a, b):
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


OUT_TOL = 1e-5  # per-step model outputs: max |graphcache - reference| / max |reference output|
LATENT_TOL = 1e-5  # final latents: max |graphcache - reference| / max |reference latent|


def compare_with_reference(dit, method, num_steps, sampler, options, *, layer_divisor=None, seed=0):
    """`options`: ALL of the method's options, spelled out (both sides get the same values).

    Sample with graphcache's `method` and with ReferenceToCa (same seed, CFG 1.5) and assert:
    the same RNG stream (same draws), the same per-step kinds and fresh-token counts (the plan AND
    what the compiled selects actually took), per-step model outputs and final latents within
    OUT_TOL / LATENT_TOL. Returns the measured numbers."""
    import time

    t0 = time.perf_counter()
    cached, used = optimize_recording(dit, method, num_steps, **options)
    build_s = time.perf_counter() - t0
    duca = method == "duca"
    reference = ReferenceToCa(dit, num_steps, layer_divisor=layer_divisor,
                              **reference_kwargs(options, duca))
    lat_gc, out_gc, rng_gc, rec_gc, gc_s = sample_recorded(cached, num_steps, sampler, used, seed=seed)
    lat_ref, out_ref, rng_ref, _, ref_s = sample_recorded(reference, num_steps, sampler, seed=seed)

    # the step kinds and token counts, step by step
    assert len(reference.log) == len(cached.schedule) == num_steps
    per_step_used = rec_gc.per_step(used)
    for i, (step, types, topks) in enumerate(reference.log):
        plan = cached.schedule[i]
        assert plan.step == step == num_steps - 1 - i
        assert plan.kinds == tuple(KIND_OF_TYPE[t] for t in types), f"step {step}: kinds differ"
        planned = [k for k in (plan.tokens or ()) if k is not None]
        expected = [k for k in topks if k is not None]
        assert planned == expected, f"step {step}: planned token counts {planned} != reference {expected}"
        assert per_step_used[i] == expected, f"step {step}: selects took {per_step_used[i]} != {expected}"
    # random scores: the same draws in the same order (and the sampler's own draws after them)
    assert torch.equal(rng_gc, rng_ref), "the global RNG stream differs (different number of draws)"

    out_err, lat_err = max_rel(out_gc, out_ref), max_rel(lat_gc, lat_ref)
    metrics = dict(out_err=out_err, lat_err=lat_err, out_scale=out_ref.abs().max().item(),
                   lat_scale=lat_ref.abs().max().item(), build_s=build_s, gc_s=gc_s, ref_s=ref_s,
                   kinds="".join(_step_char(p.kinds) for p in cached.schedule.steps))
    print(f"\n{method} {sampler}{num_steps} {options.get('score')}: {metrics}")
    assert out_err <= OUT_TOL, f"per-step outputs differ by {out_err:.3g} of their scale"
    assert lat_err <= LATENT_TOL, f"final latents differ by {lat_err:.3g} of their scale"
    return cached, metrics


def _step_char(kinds):
    """One letter per step (independent of graphcache.methods.rules): F full, T partial, A skipped,
    M block 0 full + the rest partial, X block 0 full + the rest skipped."""
    rest = set(kinds[1:])
    if set(kinds) == {"full"}:
        return "F"
    if set(kinds) == {"partial"}:
        return "T"
    if set(kinds) == {"skip"}:
        return "A"
    if kinds[0] == "full" and rest == {"partial"}:
        return "M"
    if kinds[0] == "full" and rest == {"skip"}:
        return "X"
    return "?"


def is_toca_select(node):
    from graphcache.passes import token_score

    return node.op == "call_function" and getattr(node.target, "__wrapped__", node.target) is token_score.toca_select


def module_calls(gm, suffix, block=None):
    """Calls of the torch.nn layers whose path ends with `suffix` (e.g. 'attn.qkv'), optionally in one block."""
    from graph_queries import layer_calls

    return layer_calls(gm, f"blocks.{block}." if block is not None else "", suffix)


def check_token_wise_structure(cached, score):
    """Per variant: exactly one token select and one in-place cache scatter (into its MLP slot) per
    partial block, and none elsewhere; one explicit attention per full block when
    score == 'attention', none otherwise (SDPA stays); no attention work in partial blocks.
    Returns the set of step letters of the variants seen."""
    import torch
    from graphcache.ops import CACHE_SCATTER, CACHE_WRITE
    from graphcache.passes import token_score

    seen = set()
    for (kinds, _extra), gm in cached.variants.items():
        seen.add(_step_char(kinds))
        full = [b for b, k in enumerate(kinds) if k == "full"]
        partial = [b for b, k in enumerate(kinds) if k == "partial"]
        selects = [n for n in gm.graph.nodes if is_toca_select(n)]
        # the staleness counter a select reads names its block: graphcache_cache.b{block}_staleness
        blocks = sorted(int(n.args[1].target.split(".")[-1][1:].split("_")[0]) for n in selects)
        assert blocks == partial, f"{kinds}: selects in blocks {blocks}, partial blocks {partial}"
        calls = lambda fn: sum(n.op == "call_function" and n.target is fn for n in gm.graph.nodes)  # noqa: E731
        explicit, sdpa = calls(token_score.explicit_attention), calls(torch.ops.aten.scaled_dot_product_attention.default)
        vnorm = calls(token_score.value_norm_score)
        if score == "attention":
            assert (explicit, sdpa, vnorm) == (len(full), 0, 0), (kinds, explicit, sdpa, vnorm)
        else:
            assert (explicit, sdpa) == (0, len(full)), (kinds, explicit, sdpa)
            assert vnorm == (len(full) if score == "kv-norm" else 0), (kinds, vnorm)
        # a partial block's fresh MLP tokens go into its slot in place, and the slot is not copied
        scatters = sorted(n.args[0].target.split(".")[-1] for n in gm.graph.nodes if n.target is CACHE_SCATTER)
        assert scatters == sorted(f"b{b}_mlp" for b in partial), (kinds, scatters)
        copies = {n.args[0].target.split(".")[-1] for n in gm.graph.nodes if n.target is CACHE_WRITE}
        assert not copies & set(scatters), (kinds, copies)
        for b in partial:
            assert not module_calls(gm, "attn.qkv", b) and not module_calls(gm, "attn.proj", b), (kinds, b)
            assert len(module_calls(gm, "mlp.fc1", b)) == 1, (kinds, b)  # the MLP on the k fresh tokens
        for b in full:
            assert len(module_calls(gm, "attn.qkv", b)) == 1 and len(module_calls(gm, "mlp.fc1", b)) == 1
    return seen
