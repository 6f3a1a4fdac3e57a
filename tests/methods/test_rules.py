"""ToCa / DuCa step decisions (Shenyi-Z/ToCa and Shenyi-Z/DuCa `cache_functions/cal_type.py`,
`force_scheduler.py`, `fresh_ratio_scheduler.py`).

The expectations come from `_reference_run`, an independent, literal re-statement of the official
pseudo-code: a cache_dic / current pair, `cal_type` evaluated per block before it runs, and
`force_scheduler` (in torch float32, as the original) called by a full layer-0 block. The only
pasted string is the DDIM-50 N=3 ToCa schedule the official code produces, used as an anchor.
"""

import pytest
import torch

from graphcache.errors import GraphcacheError
from graphcache.methods.rules import DIT, DUCA_DIT, force_interval, fresh_tokens, kinds_string, toca_plans
from graphcache.schedule import FULL, PARTIAL, SKIP

DEPTH, TOKENS = 28, 256


# ---------------------------------------------------------------- the reference (pseudo-code)
def _ref_force_scheduler(cache_dic, current):
    w = 0.4 if cache_dic["fresh_ratio"] != 0 else 0.0
    s, S = current["step"], current["num_steps"]
    step_factor = torch.tensor(1 + w - 2 * w * s / S)  # float32
    threshold = torch.round(cache_dic["fresh_threshold"] / step_factor)
    if cache_dic["fresh_ratio"] != 0 and s in range(int(0.2 * S), int(0.4 * S)):
        threshold = torch.tensor(2.0)
    cache_dic["cal_threshold"] = int(threshold.item())


def _ref_cal_type(cache_dic, current, duca):
    first_step = current["step"] == current["num_steps"] - 1
    interval = cache_dic["fresh_threshold"] if first_step else cache_dic["cal_threshold"]
    if current["step"] % interval == 0 or first_step:
        current["type"] = "full"
    elif not duca:
        current["type"] = "ToCa"
    elif (current["step"] % interval) % 2 == 1:
        current["type"] = "ToCa"
    else:
        current["type"] = "aggressive"


def _ref_ratio(scheduler, fresh_ratio, s, S, layer, module):
    if scheduler == "ToCa-ddim50":
        sw, lw = 2.0, -0.2
    elif scheduler == "ToCa-ddpm250":
        sw, lw = 0.4, 0.8
    else:
        raise ValueError(scheduler)
    step_factor = 1 + sw - 2 * sw * s / S
    layer_factor = 1 + lw - 2 * lw * layer / 27
    module_factor = 1 - (1 - 0.6) * 2.5 if module == "attn" else 1 + 0.6 * 2.5
    ratio = torch.clamp(torch.tensor(fresh_ratio * layer_factor * step_factor * module_factor), 0, 1)
    return int(ratio * TOKENS)


def _reference_run(S, N, fresh_ratio, scheduler="ToCa-ddim50", duca=False):
    """[(step, [types per layer], [mlp topk per layer or None])] in sampling order."""
    cache_dic = {"fresh_threshold": N, "fresh_ratio": fresh_ratio, "cal_threshold": N}
    out = []
    for i in reversed(range(S)):
        current = {"step": i, "num_steps": S}
        types, topks = [], []
        for layer in range(DEPTH):
            current["layer"] = layer
            _ref_cal_type(cache_dic, current, duca)
            types.append(current["type"])
            if current["type"] == "full" and layer == 0:
                _ref_force_scheduler(cache_dic, current)
            topks.append(
                _ref_ratio(scheduler, fresh_ratio, i, S, layer, "mlp") if current["type"] == "ToCa" else None
            )
        out.append((i, types, topks))
    return out


_KIND = {"full": FULL, "ToCa": PARTIAL, "aggressive": SKIP}


def _plans(S, N, r, scheduler="ToCa-ddim50", duca=False):
    opts = dict(interval=N, fresh_ratio=r, ratio_scheduler=scheduler)
    return toca_plans(S, DEPTH, TOKENS, opts, DUCA_DIT if duca else DIT)


# ---------------------------------------------------------------- tests
def test_published_ddim50_example():
    assert kinds_string(_plans(50, 3, 0.07)) == "FTTTMFTTTFTTTFTTTMTFTTFTTFTTFTTFTFTFTFTFTFTFTFTFTF"


@pytest.mark.parametrize("duca", [False, True])
@pytest.mark.parametrize("S", [20, 50, 250])
@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_plans_match_reference(N, S, duca):
    scheduler = "ToCa-ddpm250" if S == 250 else "ToCa-ddim50"
    r = 0.05 if duca else 0.07
    plans = _plans(S, N, r, scheduler, duca)
    ref = _reference_run(S, N, r, scheduler, duca)
    assert len(plans) == S
    for i, (plan, (s, types, topks)) in enumerate(zip(plans, ref)):
        assert plan.index == i and plan.step == s == S - 1 - i
        assert plan.kinds == tuple(_KIND[t] for t in types), (s, plan.kinds)
        assert plan.tokens == tuple(topks)


@pytest.mark.parametrize("S", [20, 50, 250])
@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_force_interval_matches_reference(N, S):
    for s in range(S):
        for r in (0.07, 0.0):
            cache_dic = {"fresh_threshold": N, "fresh_ratio": r}
            _ref_force_scheduler(cache_dic, {"step": s, "num_steps": S})
            assert force_interval(s, S, N, r) == cache_dic["cal_threshold"], (s, r)


@pytest.mark.parametrize("S", [20, 50, 250])
@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_sensitive_window(N, S):
    lo, hi = int(0.2 * S), int(0.4 * S)
    for s in range(S):
        if lo <= s < hi:
            assert force_interval(s, S, N, 0.07) == 2
    if S == 50:
        assert (lo, hi) == (10, 20)
    if S == 250:
        assert (lo, hi) == (50, 100)
    # inside the window, once a full step has happened there, full steps are exactly the even s
    plans = _plans(S, N, 0.07)
    by_step = {p.step: p for p in plans}
    first_full = max(s for s in range(lo, hi) if by_step[s].kinds[0] == FULL)
    for s in range(lo, first_full):
        assert (by_step[s].kinds[0] == FULL) == (s % 2 == 0), s


@pytest.mark.parametrize("duca", [False, True])
@pytest.mark.parametrize("S", [20, 50, 250])
@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_mixed_steps_exactly_where_new_interval_does_not_divide(N, S, duca):
    plans = _plans(S, N, 0.07, "ToCa-ddpm250" if S == 250 else "ToCa-ddim50", duca)
    for p in plans:
        if p.kinds[0] != FULL or p.step == S - 1:
            continue
        new_t = force_interval(p.step, S, N, 0.07)
        mixed = any(k != FULL for k in p.kinds[1:])
        assert mixed == (p.step % new_t != 0), p.step
        if mixed:
            expected = PARTIAL if (not duca or (p.step % new_t) % 2 == 1) else SKIP
            assert set(p.kinds[1:]) == {expected}
    assert all(k == FULL for k in plans[0].kinds)  # the first step is always fully computed


def test_mixed_steps_exist():
    assert "M" in kinds_string(_plans(50, 3, 0.07))
    assert "X" in kinds_string(_plans(50, 3, 0.05, "ToCa", duca=True))


def _runs_after_full(string, t_len):
    """The chars that follow each 'F' for t_len-1 positions, where all of them are uncut by F/M/X."""
    out = []
    for i, ch in enumerate(string):
        seg = string[i + 1 : i + t_len]
        if ch == "F" and len(seg) == t_len - 1 and not set(seg) & set("FMX"):
            out.append(seg)
    return out


def test_duca_alternation_t3_t4():
    # Early DDIM-50 steps: with N=2 the scheduler gives T = round(2/0.6..) = 3; with N=3 T = 4 or 5.
    for N, T in ((2, 3), (3, 4)):
        plans = _plans(50, N, 0.05, "ToCa", duca=True)
        for p in plans[1:]:
            if p.kinds[0] == FULL:
                full_s, t = p.step, force_interval(p.step, 50, N, 0.05)
                if t != T or full_s % t:
                    continue
                following = [q for q in plans if full_s - t < q.step < full_s]
                chars = "".join(kinds_string([q]) for q in sorted(following, key=lambda q: -q.step))
                assert chars == {3: "AT", 4: "TAT"}[T], (full_s, chars)
                break
        else:
            pytest.fail(f"no T={T} cycle found")


def test_duca_residue_rule_literal():
    # aggressive first after a full step for T=3; F,T,A,T for T=4; T=2 gives F,T alternation
    plans = _plans(50, 3, 0.05, "ToCa", duca=True)
    for p in plans[1:]:
        if p.kinds[1] == FULL:
            continue
        # the T in force for blocks 1.. of step s is the one set by the last full layer-0 block
        last_full = min(q.step for q in plans if q.kinds[0] == FULL and q.step >= p.step)
        t = force_interval(last_full, 50, 3, 0.05)
        residue = p.step % t
        assert p.kinds[1] == (PARTIAL if residue % 2 == 1 else SKIP)
        if t == 3:
            assert (residue == 2) == (p.kinds[1] == SKIP)
        if t == 2:
            assert p.kinds[1] == PARTIAL


@pytest.mark.parametrize("duca", [False, True])
@pytest.mark.parametrize("S", [20, 50, 250])
@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_fora_mode_constant_interval(N, S, duca):
    plans = _plans(S, N, 0.0, "ToCa-ddim50", duca)
    for s in range(S):
        assert force_interval(s, S, N, 0.0) == N
    for p in plans:
        full = p.step == S - 1 or p.step % N == 0
        assert len(set(p.kinds)) == 1  # no mixed steps
        assert (p.kinds[0] == FULL) == full
        assert all(t in (None, 0) for t in p.tokens)
    assert "M" not in kinds_string(plans) and "X" not in kinds_string(plans)


def test_ddim50_tokens_zero_for_early_steps():
    for s in range(50):
        for layer in range(DEPTH):
            n = fresh_tokens("ToCa-ddim50", 0.07, s, 50, layer, DEPTH, "mlp", TOKENS)
            if s >= 38:  # step_factor = 3 - 0.08 s <= 0
                assert n == 0
            elif s <= 30:
                assert n > 0
    for p in _plans(50, 3, 0.07):
        if p.step >= 38:
            assert all(t in (None, 0) for t in p.tokens)


def test_ddim50_deeper_layers_more_tokens():
    for s in range(0, 35):
        counts = [fresh_tokens("ToCa-ddim50", 0.07, s, 50, l, DEPTH, "mlp", TOKENS) for l in range(DEPTH)]
        assert counts == sorted(counts)
        if s < 30:
            assert counts[-1] > counts[0]


def test_attention_never_partial():
    for sched in ("ToCa-ddim50", "ToCa-ddpm250"):
        for s in range(0, 250, 7):
            for layer in range(DEPTH):
                assert fresh_tokens(sched, 1.0, s, 250, layer, DEPTH, "attn", TOKENS) == 0


def test_ddpm250_formula():
    for s in range(250):
        for layer in range(DEPTH):
            expect = _ref_ratio("ToCa-ddpm250", 0.07, s, 250, layer, "mlp")
            assert fresh_tokens("ToCa-ddpm250", 0.07, s, 250, layer, DEPTH, "mlp", TOKENS) == expect
    assert fresh_tokens("ToCa-ddpm250", 0.07, 0, 250, 0, DEPTH, "mlp", TOKENS) == int(
        torch.tensor(0.07 * 1.8 * 1.4 * 2.5) * 256
    )
    # ddpm250: shallow layers compute more (lw = 0.8)
    assert fresh_tokens("ToCa-ddpm250", 0.07, 0, 250, 0, DEPTH, "mlp", TOKENS) > fresh_tokens(
        "ToCa-ddpm250", 0.07, 0, 250, 27, DEPTH, "mlp", TOKENS
    )


def test_ratio_clamped_to_one():
    assert fresh_tokens("ToCa-ddim50", 1.0, 0, 50, 27, DEPTH, "mlp", TOKENS) == TOKENS


def test_unknown_scheduler():
    with pytest.raises(GraphcacheError, match="ToCa-ddim50.*ToCa-ddpm250"):
        fresh_tokens("linear", 0.07, 3, 50, 0, DEPTH, "mlp", TOKENS)
    # the official ToCa default 'ToCa' is not a DiT ratio scheduler: a clear error, not a crash
    with pytest.raises(GraphcacheError, match="ToCa-ddim50"):
        _plans(50, 3, 0.07, "ToCa")
    # DuCa's 'ToCa' scheduler is ToCa-ddim50
    assert _plans(50, 3, 0.05, "ToCa", duca=True) == _plans(50, 3, 0.05, "ToCa-ddim50", duca=True)
    with pytest.raises(GraphcacheError):
        fresh_tokens("ToCa-ddim50", 0.07, 3, 50, 0, DEPTH, "cross", TOKENS)


def test_other_depth_layer_factor_spans_the_model():
    # generalisation: /(depth-1) — first and last block get the DiT-XL first/last factors
    for s in range(0, 30, 3):
        assert fresh_tokens("ToCa-ddim50", 0.07, s, 50, 0, 12, "mlp", TOKENS) == _ref_ratio(
            "ToCa-ddim50", 0.07, s, 50, 0, "mlp"
        )
        assert fresh_tokens("ToCa-ddim50", 0.07, s, 50, 11, 12, "mlp", TOKENS) == _ref_ratio(
            "ToCa-ddim50", 0.07, s, 50, 27, "mlp"
        )
    assert len(toca_plans(20, 1, 64, dict(interval=3, fresh_ratio=0.07, ratio_scheduler="ToCa-ddim50"))) == 20
