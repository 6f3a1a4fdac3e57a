"""The papers' FLOPs accounting, generalised to any DiT size: the analytic per-block counts of the
official DiT code's `test_FLOPs` mode (Shenyi-Z/ToCa `DiT-ToCa/`, and the DuCa, TaylorSeer and
ClusCa DiT code derived from it), which give the FLOPs columns of those papers' DiT tables.

Counts cover the transformer blocks only (embedders and final layer are not counted), per sampling
run, with B = 2 rows on DiT (one image with classifier-free guidance). With B, N tokens, C hidden,
H heads, hd = C/H and M = mlp_ratio*C MLP hidden units (4C on DiT), where the official count writes 4C:

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

diffusers' MMDiT and video transformers (no published per-block count either; the same rules read
off each block's code). N image (or video patch) tokens, L text tokens, T = N + L, M the MLP width,
attn(q, k) = B*H*q*hd + B*H*q*k*hd*2 + B*H*q*k*5 + B*H*q*k*hd*2 (QK^T, softmax and AV as above),
ada(k) = B*C + k*B*C*C (a SiLU and a C -> kC projection of the time embedding, counted as DiT's
adaLN). Every LayerNorm and every RMSNorm of queries and keys counts one FLOP per element, as the
DiT count does its LayerNorms. Counted as nothing, like DiT's positional embedding: RoPE, the
gates and residual adds, the modulation's scale and shift.

    joint block (FLUX and HunyuanVideo double-stream, SD3):
      full    = ada(6) + ada(6)                       modulation of the image and the text stream
              + 2*B*N*C + 2*B*L*C                     two LayerNorms per stream
              + B*T*C*3C*2 + 2*B*T*C + attn(T, T)     QKV of both streams, QK RMSNorm, joint attention
              + B*N*C*C*2 + B*L*C*C*2                 output projection per stream
              + mlp(N) + mlp(L)                       GELU-tanh MLP per stream
      partial = the block's LayerNorms (ToCa; one per stream: B*T*C for ClusCa) + its modulation
              + mlp(fresh) + mlp(fresh_text)          attention of both streams read from cache
    single block (FLUX and HunyuanVideo, after the double blocks; one stream of T tokens):
      full    = ada(3) + B*T*C + B*T*C*3C*2 + 2*B*T*C + attn(T, T)     no attention output projection
              + B*T*C*M*2 + B*T*M*6                   proj_mlp and GELU-tanh, in parallel with attention
              + B*T*(C+M)*C*2                         proj_out of attention and MLP together
      partial = ada(3) + B*T*C + B*T*C*2C*2 + B*T*C   LayerNorm, K and V, K's RMSNorm on all tokens
              + B*k*C + B*k*C*C*2 + B*k*C + attn(k, T)  LayerNorm, Q, Q's RMSNorm of the k selected
              + B*k*C*M*2 + B*k*M*6 + B*k*(C+M)*C*2   queries (ToCa's FLUX profile); their MLP, proj_out

SD3's last block is context_pre_only: its text stream is modulated by ada(2) with one LayerNorm,
and its text tokens are projected to Q, K and V and attended (their attention output is discarded)
but have no output projection and no MLP. SD3.5's dual-attention blocks modulate the image stream by
ada(9) and add an image self-attention, B*N*C*3C*2 + 2*B*N*C + attn(N, N) + B*N*C*C*2. The QK
RMSNorm terms are counted where the model has them: always on FLUX and Wan, on SD3 and HunyuanVideo
when the config's qk_norm names one (SD3.5's and HunyuanVideo's do; SD3's does not).

    Wan block (self-attention, cross-attention over the text, FFN; the time projection is outside
    the blocks, as PixArt-α's adaLN-single: each block adds its 6C table, ada = 6*B*C):
      cross(n) = B*n*C*C*2 + B*L*C*2C*2 + B*n*C + B*L*C + attn(n, L) + B*n*C*C*2
      full     = ada + (2 or 3)*B*N*C (the third LayerNorm before the cross-attention when
                 cross_attn_norm) + B*N*C*3C*2 + 2*B*N*C + attn(N, N) + B*N*C*C*2 + cross(N) + mlp(N)
      partial  = the block's LayerNorms (ToCa; B*N*C for ClusCa) + ada + mlp(fresh) + cross(fresh_cross)

Reuse and forecast blocks cost their modulation (both streams of a joint block), skip blocks 0. A
schedule's blocks are the model's blocks in order: FLUX's and HunyuanVideo's double blocks, then
their single blocks. A partial joint block computes its plan's `text_tokens` of the text MLP
(`fresh_text`; none: 0), a partial single block its `joint_tokens`. The default batch is the
model's sampling batch:
2 (CFG) for DiT, PixArt-α, SD3 and Wan; 1 for FLUX and HunyuanVideo (guidance embedded).

Sanity figure: FLUX.1-dev at 1024x1024 (N = 4096, L = 512, 19 double and 38 single blocks,
C = 3072, H = 24, M = 4C, B = 1) counts 74.533e12 per step and 3726.67e12 over 50 steps, 0.19%
over the 3719.50 T "original" of the ToCa README's FLUX table. Leaving out the softmax's 5 FLOPs
per attention score (7.26 T here) would give 3719.40 T.
"""

from __future__ import annotations

from math import prod

from .errors import GraphcacheError
from .schedule import FORECAST, FULL, PARTIAL, REUSE, SKIP, Schedule

# DiT-XL/2 at 256x256, one image with CFG
DIT_XL_2 = dict(architecture="dit", batch=2, tokens=256, hidden=1152, heads=16, mlp_ratio=4.0)
PARTIAL_STYLES = ("toca", "clusca")
MODULATIONS = ("adaln", "single")  # DiT's per-block adaLN; PixArt-α's adaLN-single
# Token counts at the diffusers pipelines' default sizes, for configs that do not fix one:
# FLUX 1024x1024 is a 128x128 latent packed 2x2; Wan's 81 frames at 480x832 and HunyuanVideo's
# 129 frames at 720x1280 are latents of (frames-1)/4+1 frames at 1/8 the size, cut into patches.
FLUX_TOKENS = 4096
WAN_LATENT = (21, 60, 104)
HUNYUAN_VIDEO_LATENT = (33, 90, 160)
# Text tokens the pipelines encode by default: FLUX.1-dev's T5 length (schnell: 256), SD3's 77 CLIP
# tokens followed by 256 T5 tokens, Wan's padded UMT5 length, HunyuanVideo's LLaMA length
FLUX_TEXT_TOKENS = 512
SD3_TEXT_TOKENS = 77 + 256
WAN_TEXT_TOKENS = 512
HUNYUAN_VIDEO_TEXT_TOKENS = 256


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


def _modulation(batch: int, hidden: int, chunks: int) -> int:
    """SiLU of the time embedding and its projection to `chunks` vectors of width C (DiT's adaLN: 6)."""
    return batch * hidden + chunks * batch * hidden * hidden


def _self_attention(batch: int, tokens: int, hidden: int, heads: int, qk_norm: bool) -> int:
    """QKV projection, the RMSNorm of queries and keys, attention and output projection."""
    b, n, c = batch, tokens, hidden
    return b * n * c * 3 * c * 2 + (2 * b * n * c if qk_norm else 0) + _attention(b, n, n, c, heads) \
        + b * n * c * c * 2


def _partial_norms(style: str, block_norms: int, one_per_stream: int) -> int:
    """LayerNorms a partial block counts: all of the block's (ToCa), or one per stream (ClusCa)."""
    if style == "toca":
        return block_norms
    if style == "clusca":
        return one_per_stream
    raise GraphcacheError(f"unknown partial style {style!r}; choose one of {', '.join(PARTIAL_STYLES)}")


def _dit_block(
    kind: str,
    block: int,
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
    """A DiT or PixArt-α block (the module docstring's first formulas)."""
    del block  # DiT and PixArt-α blocks are all alike
    b, n, c = batch, tokens, hidden
    m = int(c * mlp_ratio)  # as the model builds its MLP: int(hidden_size * mlp_ratio)
    if modulation not in MODULATIONS:
        raise GraphcacheError(f"unknown modulation {modulation!r}; choose one of {', '.join(MODULATIONS)}")
    ada = _modulation(b, c, 6) if modulation == "adaln" else 6 * b * c

    def cross(queries: int | None) -> int:
        return _cross_attention(b, queries, text_tokens, c, heads) if text_tokens and queries else 0

    if kind == FULL:
        attn = b * n * c * 3 * c * 2 + _attention(b, n, n, c, heads) + b * n * c * c * 2
        return attn + cross(n) + 2 * b * n * c + ada + _mlp(b, n, c, m)
    if kind == PARTIAL:
        _needs_fresh(fresh)
        return _partial_norms(partial_style, 2 * b * n * c, b * n * c) + ada + _mlp(b, int(fresh), c, m) \
            + cross(fresh_cross)
    return _cached(kind, ada)


def _joint_block(kind: str, *, batch: int, tokens: int, text_tokens: int, hidden: int, heads: int,
                 mlp_hidden: int, qk_norm: bool, fresh: int | None, fresh_text: int | None, partial_style: str,
                 text_output: bool = True, dual_attention: bool = False) -> int:
    """A two-stream block: FLUX's and HunyuanVideo's double blocks, SD3's joint blocks.
    `text_output` False: SD3's context_pre_only last block; `dual_attention`: SD3.5's extra image
    self-attention, with its own shift, scale and gate in the image modulation."""
    b, n, l, c = batch, tokens, text_tokens, hidden
    ada = _modulation(b, c, 9 if dual_attention else 6) + _modulation(b, c, 6 if text_output else 2)
    norms = 2 * b * n * c + (2 if text_output else 1) * b * l * c
    if kind == FULL:
        t = n + l
        joint = b * t * c * 3 * c * 2 + (2 * b * t * c if qk_norm else 0) + _attention(b, t, t, c, heads)
        image = b * n * c * c * 2 + _mlp(b, n, c, mlp_hidden)
        text = b * l * c * c * 2 + _mlp(b, l, c, mlp_hidden) if text_output else 0
        dual = _self_attention(b, n, c, heads, qk_norm) if dual_attention else 0
        return ada + norms + joint + image + text + dual
    if kind == PARTIAL:
        _needs_fresh(fresh)
        text_mlp = _mlp(b, int(fresh_text or 0), c, mlp_hidden) if text_output else 0
        return _partial_norms(partial_style, norms, b * (n + l) * c) + ada + _mlp(b, int(fresh), c, mlp_hidden) \
            + text_mlp
    return _cached(kind, ada)


def _single_block(kind: str, *, batch: int, tokens: int, text_tokens: int, hidden: int, heads: int, mlp_hidden: int,
                  qk_norm: bool, fresh: int | None = None) -> int:
    """FLUX's and HunyuanVideo's single-stream block over the T = N + L tokens of both streams; a
    partial one computes `fresh` queries against keys and values of all T tokens."""
    b, t, c, m = batch, tokens + text_tokens, hidden, mlp_hidden
    ada = _modulation(b, c, 3)
    if kind == FULL:
        attention = b * t * c * 3 * c * 2 + (2 * b * t * c if qk_norm else 0) + _attention(b, t, t, c, heads)
        return ada + b * t * c + attention + b * t * c * m * 2 + b * t * m * 6 + b * t * (c + m) * c * 2
    if kind == PARTIAL:
        _needs_fresh(fresh)
        k = int(fresh)
        keys_values = b * t * c + b * t * c * 2 * c * 2 + (b * t * c if qk_norm else 0)
        queries = b * k * c + b * k * c * c * 2 + (b * k * c if qk_norm else 0) + _attention(b, k, t, c, heads)
        return ada + keys_values + queries + b * k * c * m * 2 + b * k * m * 6 + b * k * (c + m) * c * 2
    return _cached(kind, ada)


def _flux_block(kind: str, block: int, *, double_blocks: int, fresh: int | None = None,
                fresh_text: int | None = None, partial_style: str = "toca", **dims) -> int:
    """FLUX and HunyuanVideo: `double_blocks` double-stream blocks, then the single-stream blocks."""
    if block < double_blocks:
        return _joint_block(kind, fresh=fresh, fresh_text=fresh_text, partial_style=partial_style, **dims)
    return _single_block(kind, fresh=fresh, **dims)


def _sd3_block(kind: str, block: int, *, blocks: int, dual_attention_blocks: tuple[int, ...] = (),
               fresh: int | None = None, fresh_text: int | None = None, partial_style: str = "toca", **dims) -> int:
    """SD3's joint blocks: the last of the `blocks` has no text output; `dual_attention_blocks`
    (SD3.5) add an image self-attention."""
    return _joint_block(kind, fresh=fresh, fresh_text=fresh_text, partial_style=partial_style,
                        text_output=block < blocks - 1, dual_attention=block in dual_attention_blocks, **dims)


def _wan_block(kind: str, block: int, *, batch: int, tokens: int, text_tokens: int, hidden: int, heads: int,
               mlp_hidden: int, cross_attn_norm: bool, fresh: int | None = None, fresh_cross: int | None = None,
               partial_style: str = "toca") -> int:
    """A Wan block: self-attention and cross-attention over the text (both with QK RMSNorm), FFN."""
    del block  # Wan blocks are all alike
    b, n, l, c = batch, tokens, text_tokens, hidden
    ada = 6 * b * c
    norms = (3 if cross_attn_norm else 2) * b * n * c

    def cross(queries: int | None) -> int:
        return _cross_attention(b, queries, l, c, heads) + b * queries * c + b * l * c if queries else 0

    if kind == FULL:
        return ada + norms + _self_attention(b, n, c, heads, qk_norm=True) + cross(n) + _mlp(b, n, c, mlp_hidden)
    if kind == PARTIAL:
        _needs_fresh(fresh)
        return _partial_norms(partial_style, norms, b * n * c) + ada + _mlp(b, int(fresh), c, mlp_hidden) \
            + cross(fresh_cross)
    return _cached(kind, ada)


def _needs_fresh(fresh: int | None) -> None:
    if fresh is None:
        raise GraphcacheError("a partial block needs its fresh-token count to be counted")


def _cached(kind: str, modulation: int) -> int:
    """Reuse and forecast blocks compute only their modulation; skip blocks nothing."""
    if kind in (REUSE, FORECAST):
        return modulation
    if kind == SKIP:
        return 0
    raise GraphcacheError(f"unknown block kind {kind!r}")


BLOCK_COSTS = {"dit": _dit_block, "flux": _flux_block, "sd3": _sd3_block, "wan": _wan_block}


def block_flops(kind: str, *, architecture: str = "dit", block: int = 0, **dims) -> int:
    """FLOPs of one block of the given kind (the module docstring's formulas). `architecture`: a key
    of BLOCK_COSTS (DiT and PixArt-α are "dit", HunyuanVideo is "flux"); `block`: its index in the
    schedule; `dims`: the architecture's dimensions (`model_dims`) and, for a partial block,
    `fresh` (image tokens per row its MLP computes), `fresh_cross` (queries its cross-attention
    computes; None: read from cache) or `fresh_text` (text tokens its text MLP computes; None: 0)."""
    if architecture not in BLOCK_COSTS:
        raise GraphcacheError(f"unknown architecture {architecture!r}; choose one of {', '.join(BLOCK_COSTS)}")
    return BLOCK_COSTS[architecture](kind, block, **dims)


def schedule_flops(schedule: Schedule, *, partial_style: str | None = None, **dims) -> dict:
    """Total FLOPs of a sampling run, the uncached total, speedup = uncached/total, and per step.
    `dims`: `model_dims`' keys; DiT dimensions not given are DiT-XL/2's at 256px, B = 2."""
    if dims.get("architecture", "dit") == "dit":
        dims = {**DIT_XL_2, **dims}
    if partial_style is None:
        partial_style = "clusca" if schedule.method.lower() == "clusca" else "toca"
    blocks = range(schedule.depth)
    per_step = []
    for plan in schedule.steps:
        none = (None,) * len(plan.kinds)
        counts = zip(plan.tokens or none, plan.joint_tokens or none, plan.text_tokens or none,
                     plan.cross_tokens or none)
        per_step.append(
            sum(
                block_flops(kind, block=i, fresh=fresh if fresh is not None else joint, partial_style=partial_style,
                            **({"fresh_cross": cross} if cross is not None else {}),
                            **({"fresh_text": text} if text is not None else {}), **dims)
                for i, kind, (fresh, joint, text, cross) in zip(blocks, plan.kinds, counts)
            )
        )
    total = sum(per_step)
    uncached = schedule.num_steps * sum(block_flops(FULL, block=i, **dims) for i in blocks)
    speedup = uncached / total if total else float("inf")
    return {"total": total, "uncached": uncached, "speedup": speedup, "per_step": per_step}


def model_dims(model, text_tokens: int | None = None, tokens: int | None = None) -> dict:
    """The `schedule_flops` dimensions of a graphcache DiT (or its DiTConfig), or of a diffusers
    DiT, PixArt-α, FLUX, SD3, Wan (text-to-video) or HunyuanVideo transformer, with the model's
    sampling batch. `text_tokens` and `tokens` (image or video tokens) default to the
    pipeline's: PixArt-α's 120 caption tokens, and the FLUX_*, SD3_*, WAN_* and HUNYUAN_VIDEO_*
    sizes where the config does not fix the token count."""
    name = type(model).__name__
    config = getattr(model, "config", model)
    if name == "PixArtTransformer2DModel":
        from .diffusers_models import PIXART_TEXT_TOKENS

        grid = config.sample_size // config.patch_size
        hidden = config.num_attention_heads * config.attention_head_dim
        mlp = model.transformer_blocks[0].ff.net[-1]  # the MLP's output projection: inner -> hidden
        return dict(architecture="dit", batch=2, tokens=grid * grid if tokens is None else tokens, hidden=hidden,
                    heads=config.num_attention_heads, mlp_ratio=mlp.in_features / hidden,
                    text_tokens=PIXART_TEXT_TOKENS if text_tokens is None else text_tokens, modulation="single")
    if name in TRANSFORMER_DIMS:
        heads = config.num_attention_heads
        shared = dict(hidden=heads * config.attention_head_dim, heads=heads)
        dims = TRANSFORMER_DIMS[name](config, shared)
        if tokens is not None:
            dims["tokens"] = tokens
        if text_tokens is not None:
            dims["text_tokens"] = text_tokens
        return dims
    if name == "DiTTransformer2DModel":  # diffusers' DiT: the same blocks as the built-in DiT
        from .models.convert_diffusers import dit_config_from_diffusers

        config = dit_config_from_diffusers(config)
    try:
        grid = config.input_size // config.patch_size
        return dict(architecture="dit", batch=2, tokens=grid * grid if tokens is None else tokens,
                    hidden=config.hidden_size, heads=config.num_heads, mlp_ratio=config.mlp_ratio)
    except AttributeError:
        raise GraphcacheError(f"FLOPs are not available for {name}: graphcache counts DiT, PixArt-α, FLUX, SD3, "
                              "Wan and HunyuanVideo blocks") from None


def _flux_dims(config, shared: dict) -> dict:
    return dict(architecture="flux", batch=1, tokens=FLUX_TOKENS, text_tokens=FLUX_TEXT_TOKENS,
                mlp_hidden=4 * shared["hidden"], double_blocks=config.num_layers, qk_norm=True, **shared)


def _sd3_dims(config, shared: dict) -> dict:
    grid = config.sample_size // config.patch_size
    return dict(architecture="sd3", batch=2, tokens=grid * grid, text_tokens=SD3_TEXT_TOKENS,
                mlp_hidden=4 * shared["hidden"], blocks=config.num_layers,
                dual_attention_blocks=tuple(config.dual_attention_layers), qk_norm=config.qk_norm is not None,
                **shared)


def _wan_dims(config, shared: dict) -> dict:
    if config.added_kv_proj_dim is not None:
        raise GraphcacheError("FLOPs are not available for image-to-video Wan: its image-context attention is not "
                              "counted yet")
    return dict(architecture="wan", batch=2, tokens=prod(s // p for s, p in zip(WAN_LATENT, config.patch_size)),
                text_tokens=WAN_TEXT_TOKENS, mlp_hidden=config.ffn_dim, cross_attn_norm=config.cross_attn_norm,
                **shared)


def _hunyuan_video_dims(config, shared: dict) -> dict:
    if config.image_condition_type == "token_replace":
        raise GraphcacheError("FLOPs are not available for token-replace HunyuanVideo: its first-frame modulation "
                              "is not counted yet")
    patch = (config.patch_size_t, config.patch_size, config.patch_size)
    return dict(architecture="flux", batch=1, tokens=prod(s // p for s, p in zip(HUNYUAN_VIDEO_LATENT, patch)),
                text_tokens=HUNYUAN_VIDEO_TEXT_TOKENS, mlp_hidden=int(shared["hidden"] * config.mlp_ratio),
                double_blocks=config.num_layers, qk_norm=config.qk_norm is not None, **shared)


# diffusers class name -> its dimensions from (config, {"hidden", "heads"})
TRANSFORMER_DIMS = {"FluxTransformer2DModel": _flux_dims, "SD3Transformer2DModel": _sd3_dims,
              "WanTransformer3DModel": _wan_dims, "HunyuanVideoTransformer3DModel": _hunyuan_video_dims}


def flops_json(schedule: Schedule, model=None, text_tokens: int | None = None, tokens: int | None = None) -> dict:
    """{"total", "uncached", "speedup"} in FLOPs (not TFLOPs), with the model's sampling batch.

    `model`: a model `model_dims` counts (with `text_tokens` text tokens and `tokens` image or
    video tokens, by default the pipeline's); DiT-XL/2 at 256px if None. Other models raise
    GraphcacheError.
    """
    dims = model_dims(model, text_tokens, tokens) if model is not None else DIT_XL_2
    r = schedule_flops(schedule, **dims)
    return {"total": r["total"], "uncached": r["uncached"], "speedup": r["speedup"]}
