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
"""

from __future__ import annotations

from .errors import GraphcacheError
from .schedule import FORECAST, FULL, PARTIAL, REUSE, SKIP, Schedule

# DiT-XL/2 at 256x256: tokens, hidden, heads, mlp_ratio
DIT_XL_2 = dict(tokens=256, hidden=1152, heads=16, mlp_ratio=4.0)
PARTIAL_STYLES = ("toca", "clusca")


def _mlp(batch: int, n: int, hidden: int, mlp_hidden: int) -> int:
    return batch * n * hidden * mlp_hidden * 2 + batch * n * mlp_hidden * hidden * 2 + batch * n * mlp_hidden * 6


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
) -> int:
    """FLOPs of one block of the given kind (the module docstring's formulas). `fresh`: tokens per row
    a partial MLP computes."""
    b, n, c, h = batch, tokens, hidden, heads
    hd = c // h
    m = int(c * mlp_ratio)  # as the model builds its MLP: int(hidden_size * mlp_ratio)
    ada = b * c + 6 * b * c * c
    if kind == FULL:
        attn = (
            b * n * c * 3 * c * 2
            + b * h * n * hd
            + b * h * n * n * hd * 2
            + b * h * n * n * 5
            + b * h * n * n * hd * 2
            + b * n * c * c * 2
        )
        return attn + 2 * b * n * c + ada + _mlp(b, n, c, m)
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
        return norms + ada + _mlp(b, int(fresh), c, m)
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
) -> dict:
    """Total FLOPs of a sampling run, the uncached total, speedup = uncached/total, and per step."""
    if partial_style is None:
        partial_style = "clusca" if schedule.method.lower() == "clusca" else "toca"
    dims = dict(batch=batch, tokens=tokens, hidden=hidden, heads=heads, mlp_ratio=mlp_ratio)
    full = block_flops(FULL, **dims)
    per_step = []
    for plan in schedule.steps:
        toks = plan.tokens or (None,) * len(plan.kinds)
        per_step.append(
            sum(
                block_flops(kind, fresh=fresh, partial_style=partial_style, **dims)
                for kind, fresh in zip(plan.kinds, toks)
            )
        )
    total = sum(per_step)
    uncached = full * schedule.depth * schedule.num_steps
    speedup = uncached / total if total else float("inf")
    return {"total": total, "uncached": uncached, "speedup": speedup, "per_step": per_step}


def _model_dims(model) -> dict:
    config = getattr(model, "config", model)
    if type(model).__name__ == "DiTTransformer2DModel":  # diffusers' DiT: the same blocks as the built-in DiT
        from .models.convert_diffusers import dit_config_from_diffusers

        config = dit_config_from_diffusers(config)
    try:
        grid = config.input_size // config.patch_size
        return dict(
            tokens=grid * grid, hidden=config.hidden_size, heads=config.num_heads, mlp_ratio=config.mlp_ratio
        )
    except AttributeError:
        raise GraphcacheError(f"FLOPs are not available for {type(model).__name__}: the papers' accounting covers "
                              "DiT blocks (self-attention and MLP) only") from None


def flops_json(schedule: Schedule, model=None) -> dict:
    """{"total", "uncached", "speedup"} in FLOPs (not TFLOPs), B = 2 (one image with CFG).

    `model`: a graphcache DiT (or its DiTConfig) or a diffusers DiT whose size is counted; DiT-XL/2 at
    256px if None. Other models (PixArt-α's cross-attention blocks) raise GraphcacheError.
    """
    dims = _model_dims(model) if model is not None else DIT_XL_2
    r = schedule_flops(schedule, batch=2, **dims)
    return {"total": r["total"], "uncached": r["uncached"], "speedup": r["speedup"]}
