"""FLOPs accounting (graphcache.flops) against the published DiT-XL/2 DDIM-50 numbers: the FLOPs
and speedup columns of the DiT tables of ToCa (arXiv 2410.05317), DuCa (2412.18911), TaylorSeer
(2503.06923) and ClusCa (2509.10312)."""

import pytest

from graphcache.errors import GraphcacheError
from graphcache.flops import block_flops, flops_json, model_dims, schedule_flops
from graphcache.methods import fora
from graphcache.methods.rules import DIT, DUCA_DIT, toca_plans
from graphcache.models.dit import DiT, dit_config
from graphcache.schedule import FORECAST, FULL, PARTIAL, REUSE, SKIP, Schedule, StepPlan, descending

XL = dict(batch=2, tokens=256, hidden=1152, heads=16)
S, DEPTH = 50, 28
T = 1e12


def _close(value, published, rel=0.01):
    return abs(value - published) <= rel * published


def test_full_block_and_uncached():
    step = DEPTH * block_flops(FULL, **XL)
    assert abs(step - 0.47471e12) <= 0.00001e12
    r = schedule_flops(fora.METHOD.schedule(S, options={"interval": 1}))
    assert r["total"] == r["uncached"] == S * step
    assert abs(r["uncached"] - 23.735e12) <= 0.001e12
    assert r["speedup"] == 1.0


def test_block_formulas_literal():
    B, N, C, H, hd = 2, 256, 1152, 16, 72
    mlp = lambda n: B * n * C * 4 * C * 2 + B * n * 4 * C * C * 2 + B * n * 4 * C * 6  # noqa: E731
    attn = (
        B * N * C * 3 * C * 2 + B * H * N * hd + B * H * N * N * hd * 2 + B * H * N * N * 5
        + B * H * N * N * hd * 2 + B * N * C * C * 2
    )
    ada = B * C + 6 * B * C * C
    assert block_flops(FULL, **XL) == attn + 2 * B * N * C + ada + mlp(N)
    assert block_flops(PARTIAL, fresh=17, **XL) == 2 * B * N * C + ada + mlp(17)
    assert block_flops(PARTIAL, fresh=16, partial_style="clusca", **XL) == B * N * C + ada + mlp(16)
    assert block_flops(REUSE, **XL) == block_flops(FORECAST, **XL) == ada
    assert block_flops(SKIP, **XL) == 0
    assert isinstance(block_flops(FULL, **XL), int)
    with pytest.raises(GraphcacheError):
        block_flops(PARTIAL, **XL)  # no fresh-token count
    with pytest.raises(GraphcacheError):
        block_flops(PARTIAL, fresh=1, partial_style="nope", **XL)


def _toca_schedule(method, N, r, scheduler, duca=False):
    opts = dict(interval=N, fresh_ratio=r, ratio_scheduler=scheduler)
    return Schedule(method, opts, S, DEPTH, toca_plans(S, DEPTH, 256, opts, DUCA_DIT if duca else DIT))


def _clusca_like(method, N, K, num_steps=S):
    """The TaylorSeer / ClusCa `cal_type`, restated: s = S-1 and S-2 full; then a counter gives a full step every N calls."""
    first_enhance, counter, plans = 2, 0, []
    for i, s in descending(num_steps):
        if s > num_steps - first_enhance - 1 or counter == N - 1:
            counter = 0
            plans.append(StepPlan(i, s, (FULL,) * DEPTH, (None,) * DEPTH))
        else:
            counter += 1
            kind = PARTIAL if K > 0 else FORECAST
            plans.append(StepPlan(i, s, (kind,) * DEPTH, ((K if K > 0 else None),) * DEPTH))
    return Schedule(method, {"interval": N, "cluster_num": K}, num_steps, DEPTH, plans)


@pytest.mark.parametrize(
    "schedule, published_t, speedup",
    [
        (lambda: _toca_schedule("toca", 3, 0.07, "ToCa-ddim50"), 10.23, (2.32, 2.32)),
        (lambda: _toca_schedule("duca", 3, 0.05, "ToCa", duca=True), 9.54, (2.48, 2.49)),
        (lambda: fora.METHOD.schedule(S, options={"interval": 3}), 8.56, (2.76, 2.77)),
        (lambda: fora.METHOD.schedule(S, options={"interval": 5}), 5.24, (4.53, 4.53)),
        (lambda: _clusca_like("clusca", 5, 16), 5.98, (3.97, 3.97)),
        (lambda: _clusca_like("taylorseer", 3, 0), 8.56, (2.77, 2.77)),
        (lambda: _clusca_like("taylorseer", 5, 0), 5.24, (4.53, 4.53)),
        (lambda: _toca_schedule("duca", 5, 0.05, "ToCa", duca=True), 6.32, (3.76, 3.78)),
    ],
    ids=["toca-N3", "duca-N3", "fora-N3", "fora-N5", "clusca-N5-K16", "taylor-N3", "taylor-N5", "duca-N5"],
)
def test_published_anchors(schedule, published_t, speedup):
    r = schedule_flops(schedule())
    assert _close(r["total"], published_t * T), r["total"] / T
    lo, hi = speedup
    assert lo - 0.011 <= r["speedup"] <= hi + 0.011, r["speedup"]
    assert sum(r["per_step"]) == r["total"] and len(r["per_step"]) == S


def test_toca_exact_digits():
    # reproduced to the digit: ToCa 10.23 T and 2.32x, ClusCa 5.98 T and 3.97x
    r = schedule_flops(_toca_schedule("toca", 3, 0.07, "ToCa-ddim50"))
    assert round(r["total"] / T, 2) == 10.23 and round(r["speedup"], 2) == 2.32
    c = schedule_flops(_clusca_like("clusca", 5, 16))
    assert round(c["total"] / T, 2) == 5.98 and round(c["speedup"], 2) == 3.97


def test_partial_style_default_from_method():
    clus = _clusca_like("clusca", 5, 16)
    as_toca = Schedule("other", clus.options, S, DEPTH, clus.steps)
    a, b = schedule_flops(clus)["total"], schedule_flops(as_toca)["total"]
    assert a < b  # ClusCa counts one LayerNorm per partial block, ToCa two
    assert schedule_flops(as_toca, partial_style="clusca")["total"] == a


def test_flops_json_defaults_and_model():
    sched = fora.METHOD.schedule(S, options={"interval": 3})
    j = flops_json(sched)
    assert set(j) == {"total", "uncached", "speedup"}
    assert j["total"] == schedule_flops(sched)["total"]
    model = DiT(dit_config("DiT-S/2", input_size=16))  # 64 tokens, hidden 384, 6 heads, depth 12
    small = fora.METHOD.schedule(S, depth=12, options={"interval": 3}, num_tokens=64)
    js = flops_json(small, model)
    assert js["total"] == schedule_flops(small, tokens=64, hidden=384, heads=6)["total"]
    assert js["uncached"] == S * 12 * block_flops(FULL, batch=2, tokens=64, hidden=384, heads=6)
    with pytest.raises(GraphcacheError):
        flops_json(sched, object())


def test_toca_ddpm250_speedup():
    # The official ToCa DDPM-250 setting (N=4, fresh 0.07, ToCa-ddpm250) gives 2.73x when its
    # schedule is replayed; a regression value, not a published one
    opts = dict(interval=4, fresh_ratio=0.07, ratio_scheduler="ToCa-ddpm250")
    r = schedule_flops(Schedule("toca", opts, 250, DEPTH, toca_plans(250, DEPTH, 256, opts)))
    assert abs(r["uncached"] - 118.68e12) <= 0.01e12
    assert round(r["speedup"], 2) == 2.73


@pytest.mark.parametrize("method, published", [("toca", 10.23e12), ("duca", 9.54e12), ("clusca", 5.98e12),
                                               ("fora", 8.56e12)])
def test_registered_methods_reproduce_published_ddim50_flops(method, published):
    """The methods as users run them (defaults = paper settings, DDIM-50, DiT-XL/2 256px, CFG batch 2)
    land within 1% of the published FLOPs."""
    from graphcache.methods import get_method

    got = flops_json(get_method(method).schedule(50))
    assert abs(got["total"] - published) / published < 0.01
    assert got["uncached"] == pytest.approx(23.735e12, rel=1e-4)


def test_pixart_blocks_hand_count():
    # adaLN-single (6*B*C) and a cross-attention over L text tokens of width C, written out by hand
    B, N, C, H, hd, L = 2, 16, 32, 2, 16, 5
    dims = dict(batch=B, tokens=N, hidden=C, heads=H, text_tokens=L, modulation="single")
    mlp = lambda n: B * n * C * 4 * C * 2 + B * n * 4 * C * C * 2 + B * n * 4 * C * 6  # noqa: E731
    attn = (B * N * C * 3 * C * 2 + B * H * N * hd + B * H * N * N * hd * 2 + B * H * N * N * 5
            + B * H * N * N * hd * 2 + B * N * C * C * 2)
    cross = lambda n: (B * n * C * C * 2 + B * L * C * C * 2 * 2 + B * H * n * hd + B * H * n * L * hd * 2  # noqa: E731
                       + B * H * n * L * 5 + B * H * n * L * hd * 2 + B * n * C * C * 2)
    ada = 6 * B * C
    assert block_flops(FULL, **dims) == attn + cross(N) + 2 * B * N * C + ada + mlp(N)
    # ToCa's PixArt profile: cross-attention and MLP on their own fresh tokens, self-attention cached
    assert block_flops(PARTIAL, fresh=7, fresh_cross=3, **dims) == 2 * B * N * C + ada + mlp(7) + cross(3)
    assert block_flops(PARTIAL, fresh=7, **dims) == 2 * B * N * C + ada + mlp(7)  # cross-attention from cache
    assert block_flops(REUSE, **dims) == block_flops(FORECAST, **dims) == ada
    with pytest.raises(GraphcacheError, match="modulation"):
        block_flops(FULL, **{**dims, "modulation": "film"})


def test_pixart_model_dims_and_toca_schedule():
    from diffusers_models import pixart_transformer

    from graphcache.methods import get_method

    model = pixart_transformer()  # 16 tokens, hidden 32, 2 heads, depth 2
    schedule = get_method("toca").schedule(6, depth=2, num_tokens=16, options={"profile": "pixart"})
    assert schedule.steps[1].cross_tokens is not None
    dims = dict(batch=2, tokens=16, hidden=32, heads=2, mlp_ratio=4.0, modulation="single")
    j = flops_json(schedule, model, text_tokens=5)
    assert j["total"] == schedule_flops(schedule, text_tokens=5, **dims)["total"]
    assert j["uncached"] == 6 * 2 * block_flops(FULL, text_tokens=5, **dims)
    assert flops_json(schedule, model)["uncached"] > j["uncached"]  # PixArt-α's 120 caption tokens by default


# diffusers' MMDiT and video transformers: tiny models read for their configs only (no forward pass)

def _flux(num_layers=1, num_single_layers=1):
    import diffusers

    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def _attn(B, H, hd, q, k):  # QK^T, softmax, AV of q queries over k keys, as the DiT count writes it
    return B * H * q * hd + B * H * q * k * hd * 2 + B * H * q * k * 5 + B * H * q * k * hd * 2


def _mlp(B, n, C, M):  # two projections and GELU-tanh
    return B * n * C * M * 2 + B * n * M * C * 2 + B * n * M * 6


def test_flux_blocks_hand_count():
    B, N, L, C, H, hd, M = 1, 16, 5, 16, 2, 8, 64
    T = N + L
    dims = dict(architecture="flux", batch=B, tokens=N, text_tokens=L, hidden=C, heads=H, mlp_hidden=M,
                double_blocks=1, qk_norm=True)
    ada_double = (B * C + 6 * B * C * C) * 2  # image and text stream
    double = (ada_double + 2 * B * N * C + 2 * B * L * C + B * T * C * 3 * C * 2 + 2 * B * T * C + _attn(B, H, hd, T, T)
              + B * N * C * C * 2 + B * L * C * C * 2 + _mlp(B, N, C, M) + _mlp(B, L, C, M))
    ada_single = B * C + 3 * B * C * C
    single = (ada_single + B * T * C + B * T * C * 3 * C * 2 + 2 * B * T * C + _attn(B, H, hd, T, T)
              + B * T * C * M * 2 + B * T * M * 6 + B * T * (C + M) * C * 2)
    assert block_flops(FULL, block=0, **dims) == double == 174_506
    assert block_flops(FULL, block=1, **dims) == single == 171_850
    for kind in (REUSE, FORECAST):
        assert block_flops(kind, block=0, **dims) == ada_double
        assert block_flops(kind, block=1, **dims) == ada_single
    assert block_flops(SKIP, block=0, **dims) == block_flops(SKIP, block=1, **dims) == 0
    # partial double block: image and text MLPs on fresh tokens, attention of both streams from cache
    norms = 2 * B * N * C + 2 * B * L * C
    assert block_flops(PARTIAL, block=0, fresh=7, fresh_text=3, **dims) == norms + ada_double + _mlp(B, 7, C, M) \
        + _mlp(B, 3, C, M)
    assert block_flops(PARTIAL, block=0, fresh=7, **dims) == norms + ada_double + _mlp(B, 7, C, M)
    assert block_flops(PARTIAL, block=0, fresh=7, partial_style="clusca", **dims) == B * T * C + ada_double \
        + _mlp(B, 7, C, M)
    # partial single block (ToCa's FLUX profile): 7 queries against keys and values of all T tokens
    keys_values = B * T * C + B * T * C * 2 * C * 2 + B * T * C  # LayerNorm, K and V, K's RMSNorm
    queries = B * 7 * C + B * 7 * C * C * 2 + B * 7 * C + _attn(B, H, hd, 7, T)
    assert block_flops(PARTIAL, block=1, fresh=7, **dims) == ada_single + keys_values + queries \
        + B * 7 * C * M * 2 + B * 7 * M * 6 + B * 7 * (C + M) * C * 2
    with pytest.raises(GraphcacheError, match="fresh-token count"):
        block_flops(PARTIAL, block=1, **dims)
    with pytest.raises(GraphcacheError, match="architecture"):
        block_flops(FULL, **{**dims, "architecture": "unet"})


def test_flux_model_dims_and_fora_speedup():
    model = _flux()  # one double and one single block, hidden 16, 2 heads
    assert model_dims(model) == dict(architecture="flux", batch=1, tokens=4096, text_tokens=512, hidden=16, heads=2,
                                     mlp_hidden=64, double_blocks=1, qk_norm=True)
    schedule = fora.METHOD.schedule(S, depth=2, options={"interval": 3})
    full_steps = sum(p.kinds == (FULL, FULL) for p in schedule.steps)
    assert full_steps == 18  # s = 49, then every s % 3 == 0
    j = flops_json(schedule, model, text_tokens=5, tokens=16)  # B = 1: guidance is embedded, no CFG batch
    full, reuse = 174_506 + 171_850, (16 + 6 * 16 * 16) * 2 + 16 + 3 * 16 * 16
    assert j["uncached"] == S * full
    assert j["total"] == full_steps * full + (S - full_steps) * reuse
    assert j["speedup"] == pytest.approx(50 * 346_356 / (18 * 346_356 + 32 * 3_888))  # 2.7234


def test_sd3_blocks_hand_count():
    import diffusers

    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8)
    dims = model_dims(model, text_tokens=5)
    assert dims == dict(architecture="sd3", batch=2, tokens=16, text_tokens=5, hidden=16, heads=2, mlp_hidden=64,
                        blocks=2, dual_attention_blocks=(), qk_norm=False)
    assert model_dims(model)["text_tokens"] == 77 + 256
    B, N, L, C, H, hd, M = 2, 16, 5, 16, 2, 8, 64
    T = N + L
    joint = ((B * C + 6 * B * C * C) * 2 + 2 * B * N * C + 2 * B * L * C + B * T * C * 3 * C * 2 + _attn(B, H, hd, T, T)
             + B * N * C * C * 2 + B * L * C * C * 2 + _mlp(B, N, C, M) + _mlp(B, L, C, M))  # no QK norm on SD3
    # context_pre_only: the text stream is modulated (shift, scale) and attended, with no output projection or MLP
    ada_last = B * C + 6 * B * C * C + B * C + 2 * B * C * C
    last = (ada_last + 2 * B * N * C + B * L * C + B * T * C * 3 * C * 2 + _attn(B, H, hd, T, T)
            + B * N * C * C * 2 + _mlp(B, N, C, M))
    assert block_flops(FULL, block=0, **dims) == joint
    assert block_flops(FULL, block=1, **dims) == last
    assert block_flops(REUSE, block=1, **dims) == ada_last
    assert block_flops(PARTIAL, block=1, fresh=7, fresh_text=3, **dims) == 2 * B * N * C + B * L * C + ada_last \
        + _mlp(B, 7, C, M)  # no text MLP to compute
    schedule = fora.METHOD.schedule(S, depth=2, options={"interval": 3})
    assert schedule_flops(schedule, **dims)["uncached"] == S * (joint + last)
    # SD3.5: QK RMSNorm, and a dual-attention block's 9C modulation and extra image self-attention
    dual = dict(dims, qk_norm=True, dual_attention_blocks=(0,))
    extra = (3 * B * C * C + 2 * B * T * C + B * N * C * 3 * C * 2 + 2 * B * N * C + _attn(B, H, hd, N, N)
             + B * N * C * C * 2)
    assert block_flops(FULL, block=0, **dual) == joint + extra


def test_wan_blocks_hand_count():
    import diffusers

    def wan(**config):
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=24, num_layers=2, rope_max_seq_len=32, **config)

    model = wan()
    dims = model_dims(model, text_tokens=5, tokens=12)
    assert dims == dict(architecture="wan", batch=2, tokens=12, text_tokens=5, hidden=16, heads=2, mlp_hidden=24,
                        cross_attn_norm=True)
    assert model_dims(model)["tokens"] == 21 * 30 * 52  # 81 frames at 480x832 in 1x2x2 patches
    B, N, L, C, H, hd, M = 2, 12, 5, 16, 2, 8, 24
    self_attn = B * N * C * 3 * C * 2 + 2 * B * N * C + _attn(B, H, hd, N, N) + B * N * C * C * 2

    def cross(n):  # Q of n queries, K and V of the text, their RMSNorms, attention, output projection
        return B * n * C * C * 2 + B * L * C * 2 * C * 2 + B * n * C + B * L * C + _attn(B, H, hd, n, L) \
            + B * n * C * C * 2

    ada = 6 * B * C
    assert block_flops(FULL, block=1, **dims) == ada + 3 * B * N * C + self_attn + cross(N) + _mlp(B, N, C, M)
    assert block_flops(FULL, **{**dims, "cross_attn_norm": False}) == ada + 2 * B * N * C + self_attn + cross(N) \
        + _mlp(B, N, C, M)
    assert block_flops(PARTIAL, fresh=4, fresh_cross=3, **dims) == 3 * B * N * C + ada + _mlp(B, 4, C, M) + cross(3)
    assert block_flops(PARTIAL, fresh=4, **dims) == 3 * B * N * C + ada + _mlp(B, 4, C, M)
    assert block_flops(REUSE, **dims) == block_flops(FORECAST, **dims) == ada
    assert block_flops(SKIP, **dims) == 0
    with pytest.raises(GraphcacheError, match="image-to-video"):
        model_dims(wan(added_kv_proj_dim=16, image_dim=16))


def test_hunyuan_video_counts_as_flux():
    import diffusers

    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4))
    dims = model_dims(model, text_tokens=5, tokens=16)
    assert dims == dict(architecture="flux", batch=1, tokens=16, text_tokens=5, hidden=16, heads=2, mlp_hidden=64,
                        double_blocks=1, qk_norm=True)
    assert model_dims(model)["tokens"] == 33 * 45 * 80  # 129 frames at 720x1280 in 1x2x2 patches
    assert model_dims(model)["text_tokens"] == 256
    # the same blocks as FLUX's: the hand counts of test_flux_blocks_hand_count, double then single
    assert [block_flops(FULL, block=i, **dims) for i in (0, 1)] == [174_506, 171_850]
