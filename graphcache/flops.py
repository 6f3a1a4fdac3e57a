"""The papers' FLOPs accounting, generalised to any DiT size: the analytic per-block counts of the
official DiT code's `test_FLOPs` mode (Shenyi-Z/ToCa `DiT-ToCa/`, and the DuCa, TaylorSeer and
ClusCa DiT code derived from it), which give the FLOPs columns of those papers' DiT tables.

Counts cover the transformer blocks only (embedders and final layer are not counted), per sampling
run, with B = 2 rows (one image with classifier-free guidance). With B, N tokens, C hidden, H heads,
hd = C/H and M = mlp_ratio*C MLP hidden units (4C on DiT), where the official count writes 4C:

    attn_full = B*N*C*3C*2 + B*H*N*hd + B*H*N*N*hd*2 + B*H*N*N*5 + B*H*N*N*hd*2 + B*N*C*C*2
    mlp(n)    = B*n*C*M*2 + B*n*M*C*2 + B*n*M*6
    full      = attn_full + 2*B*N*C + B*C + 6*B*C*C + mlp(N)
    partial   = 2*B*N*C + B*C + 6*B*C*C + mlp(fresh)        (ToCa/DuCa)
              =   B*N*C + B*C + 6*B*C*C + mlp(fresh)        (ClusCa: one LN, fresh = clusters per row)
    reuse / forecast = B*C + 6*B*C*C                         (FORA / Taylor: adaLN only)
    skip      = 0                                            (DuCa aggressive)

One full DiT-XL/2 step is 0.47471e12; 50 steps are 23.735e12, the "23.74 T, 1.00x" DDIM-50
baseline of the papers' DiT tables.

PixArt-α's blocks (no published count; the same rules extended) add a cross-attention over L text
tokens of width C (the caption projection to C is outside the blocks), counted like the
self-attention with n queries:

    cross(n)  = B*n*C*C*2 + B*L*C*2C*2 + B*H*n*hd + B*H*n*L*hd*2 + B*H*n*L*5 + B*H*n*L*hd*2 + B*n*C*C*2
    full      = attn_full + cross(N) + 2*B*N*C + ada + mlp(N)
    partial   = 2*B*N*C + ada + mlp(fresh) + cross(fresh_cross)  (cross 0 when it is read from cache)

and their adaLN-single modulation is one shared projection of t (outside the blocks) plus each
block's table: ada = 6*B*C instead of B*C + 6*B*C*C.
"""

from __future__ import annotations

from .errors import GraphcacheError
from .schedule import FORECAST, FULL, PARTIAL, REUSE, SKIP, Schedule

# DiT-XL/2 at 256x256: tokens, hidden, heads, mlp_ratio
DIT_XL_2 = dict(tokens=256, hidden=1152, heads=16, mlp_ratio=4.0)
PARTIAL_STYLES = ("toca", "clusca")
MODULATIONS = ("adaln", "single")  # DiT's per-block adaLN; PixArt-α's adaLN-single


def _mlp(batch: int, n: int, hidden: int, mlp_hidden: int) -> int:
    return batch * n * hidden * mlp_hidden * 2 + batch * n * mlp_hidden * hidden * 2 + batch * n * mlp_hidden * 6


def _attention(batch: int, queries: int, keys: int, hidden: int, heads: int) -> int:
    """QK^T, softmax and AV of `queries` over `keys` tokens (projections not included)."""
    b, h, hd = batch, heads, hidden // heads
    return b * h * queries * hd + b * h * queries * keys * hd * 2 + b * h * queries * keys * 5 \
        + b * h * queries * keys * hd * 2


def _cross_attention(batch: int, queries: int, text_tokens: int, hidden: int, heads: int) -> int:
    """Q and output projections of the queries, K and V projections of the text, and the attention."""
    b, c = batch, hidden
    return (b * queries * c * c * 2 + b * text_tokens * c * 2 * c * 2
            + _attention(b, queries, text_tokens, c, heads) + b * queries * c * c * 2)


def block_flops(
    kind: str,
    *,
    batch: int,
    tokens: int,
    hidden: int,
    heads: int,
    mlp_ratio: float = 4.0,
    fresh: int | None = None,
    partial_style: str = "toca",
    text_tokens: int = 0,
    fresh_cross: int | None = None,
    modulation: str = "adaln",
) -> int:
    """FLOPs of one block of the given kind (the module docstring's formulas). `fresh`: tokens per row
    a partial MLP computes; `text_tokens`: L of a cross-attention (0: none); `fresh_cross`: queries
    a partial block's cross-attention computes (None: read from cache)."""
    b, n, c = batch, tokens, hidden
    m = int(c * mlp_ratio)  # as the model builds its MLP: int(hidden_size * mlp_ratio)
    if modulation not in MODULATIONS:
        raise GraphcacheError(f"unknown modulation {modulation!r}; choose one of {', '.join(MODULATIONS)}")
    ada = b * c + 6 * b * c * c if modulation == "adaln" else 6 * b * c

    def cross(queries: int | None) -> int:
        return _cross_attention(b, queries, text_tokens, c, heads) if text_tokens and queries else 0

    if kind == FULL:
        attn = b * n * c * 3 * c * 2 + _attention(b, n, n, c, heads) + b * n * c * c * 2
        return attn + cross(n) + 2 * b * n * c + ada + _mlp(b, n, c, m)
    if kind == PARTIAL:
        if fresh is None:
            raise GraphcacheError("a partial block needs its fresh-token count to be counted")
        if partial_style == "toca":
            norms = 2 * b * n * c
        elif partial_style == "clusca":
            norms = b * n * c
        else:
            raise GraphcacheError(
                f"unknown partial style {partial_style!r}; choose one of {', '.join(PARTIAL_STYLES)}"
            )
        return norms + ada + _mlp(b, int(fresh), c, m) + cross(fresh_cross)
    if kind in (REUSE, FORECAST):
        return ada
    if kind == SKIP:
        return 0
    raise GraphcacheError(f"unknown block kind {kind!r}")


def schedule_flops(
    schedule: Schedule,
    *,
    batch: int = 2,
    tokens: int = 256,
    hidden: int = 1152,
    heads: int = 16,
    mlp_ratio: float = 4.0,
    partial_style: str | None = None,
    text_tokens: int = 0,
    modulation: str = "adaln",
) -> dict:
    """Total FLOPs of a sampling run, the uncached total, speedup = uncached/total, and per step."""
    if partial_style is None:
        partial_style = "clusca" if schedule.method.lower() == "clusca" else "toca"
    dims = dict(batch=batch, tokens=tokens, hidden=hidden, heads=heads, mlp_ratio=mlp_ratio, text_tokens=text_tokens,
                modulation=modulation)
    full = block_flops(FULL, **dims)
    per_step = []
    for plan in schedule.steps:
        none = (None,) * len(plan.kinds)
        per_step.append(
            sum(
                block_flops(kind, fresh=fresh, fresh_cross=cross, partial_style=partial_style, **dims)
                for kind, fresh, cross in zip(plan.kinds, plan.tokens or none, plan.cross_tokens or none)
            )
        )
    total = sum(per_step)
    uncached = full * schedule.depth * schedule.num_steps
    speedup = uncached / total if total else float("inf")
    return {"total": total, "uncached": uncached, "speedup": speedup, "per_step": per_step}


def model_dims(model, text_tokens: int | None = None) -> dict:
    """The `schedule_flops` dimensions of a graphcache DiT (or its DiTConfig), a diffusers DiT, or a
    diffusers PixArt-α transformer with `text_tokens` caption tokens (default: PixArt-α's 120)."""
    name = type(model).__name__
    config = getattr(model, "config", model)
    if name == "PixArtTransformer2DModel":
        from .diffusers_models import PIXART_TEXT_TOKENS

        grid = config.sample_size // config.patch_size
        hidden = config.num_attention_heads * config.attention_head_dim
        mlp = model.transformer_blocks[0].ff.net[-1]  # the MLP's output projection: inner -> hidden
        return dict(tokens=grid * grid, hidden=hidden, heads=config.num_attention_heads,
                    mlp_ratio=mlp.in_features / hidden,
                    text_tokens=PIXART_TEXT_TOKENS if text_tokens is None else text_tokens, modulation="single")
    if name == "DiTTransformer2DModel":  # diffusers' DiT: the same blocks as the built-in DiT
        from .models.convert_diffusers import dit_config_from_diffusers

        config = dit_config_from_diffusers(config)
    try:
        grid = config.input_size // config.patch_size
        return dict(
            tokens=grid * grid, hidden=config.hidden_size, heads=config.num_heads, mlp_ratio=config.mlp_ratio
        )
    except AttributeError:
        raise GraphcacheError(f"FLOPs are not available for {name}: graphcache counts DiT and PixArt-α "
                              "blocks") from None


def flops_json(schedule: Schedule, model=None, text_tokens: int | None = None) -> dict:
    """{"total", "uncached", "speedup"} in FLOPs (not TFLOPs), B = 2 (one image with CFG).

    `model`: a graphcache DiT (or its DiTConfig), a diffusers DiT or PixArt-α transformer (with
    `text_tokens` caption tokens) whose size is counted; DiT-XL/2 at 256px if None. Other models
    raise GraphcacheError.
    """
    dims = model_dims(model, text_tokens) if model is not None else DIT_XL_2
    r = schedule_flops(schedule, batch=2, **dims)
    return {"total": r["total"], "uncached": r["uncached"], "speedup": r["speedup"]}
