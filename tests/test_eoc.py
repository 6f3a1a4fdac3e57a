"""EOC's prior (graphcache/eoc.py): what it stores, that it round-trips, that it refuses another
model, step count or resolution, the judgment's arithmetic, and `graphcache calibrate`."""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.cli import main
from graphcache.calibration import CALIBRATION_SEED, calibrate
from graphcache.eoc import Prior, fingerprint, load_prior, step_factors, step_weights
from graphcache.methods import get_method
from graphcache.models.builtin import resolve_model
from graphcache.models.dit import init_random_
from eoc_setup import EOC_STEPS

TOKENS, HIDDEN, DEPTH = 16, 64, 2


def test_prior_contents_and_round_trip(eoc_model, eoc_prior, tmp_path):
    prior = load_prior(eoc_prior)
    m = prior.meta
    assert (m["num_steps"], m["num_tokens"], m["hidden_size"], m["sampler"], m["cfg_scale"]) == (
        EOC_STEPS, TOKENS, HIDDEN, "ddim", None)
    assert m["fingerprint"] == fingerprint(eoc_model) and m["calibration_seed"] == CALIBRATION_SEED
    assert sorted(prior.trend) == ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]
    # only what the correction reads: one trend per step after the first, fp32
    for br, trend in prior.trend.items():
        assert trend.shape == (EOC_STEPS - 1, TOKENS, HIDDEN) and trend.dtype == torch.float32
        assert prior.gain[br].shape == prior.norm[br].shape == (EOC_STEPS - 1,)
        assert bool((prior.norm[br] > 0).all())
    again = load_prior(prior.save(tmp_path / "copy.safetensors"))
    assert {k: v for k, v in again.meta.items() if k != "source"} == {k: v for k, v in m.items() if k != "source"}
    assert all(torch.equal(again.trend[br], prior.trend[br]) for br in prior.trend)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write: no temp file left


def test_trend_is_the_step_difference_of_the_average(eoc_model, eoc_prior):
    """P[t] written out: the two calibration samples' branch outputs averaged, differenced."""
    outputs = {}
    block = eoc_model.blocks[1]
    hook = block.mlp.register_forward_hook(lambda mod, inp, out: outputs.setdefault(len(outputs), out.mean(0)))
    try:
        torch.manual_seed(CALIBRATION_SEED)
        noise = torch.randn(2, 4, 8, 8)
        graphcache.sample(eoc_model, [0, 1], noise=noise, seed=None, num_steps=EOC_STEPS, cfg_scale=None)
    finally:
        hook.remove()
    p = torch.stack([outputs[t] for t in range(EOC_STEPS)])
    # the prior averages in float64 what the captured graph computed: equal to float32 rounding of P
    torch.testing.assert_close(load_prior(eoc_prior).trend["b1_mlp"], p[1:] - p[:-1], rtol=0,
                               atol=1e-5 * float(p.abs().max()))


def test_refuses_another_model_steps_or_resolution(eoc_model, eoc_prior):
    other = init_random_(resolve_model("builtin:dit-tiny-random"), seed=5)
    with pytest.raises(graphcache.GraphcacheError, match="calibrated on another model"):
        graphcache.optimize(other, "fora", EOC_STEPS, eoc=str(eoc_prior))
    with pytest.raises(graphcache.GraphcacheError, match=f"calibrated for {EOC_STEPS} sampling steps, not 8"):
        graphcache.optimize(eoc_model, "fora", 8, eoc=str(eoc_prior))
    with pytest.raises(graphcache.GraphcacheError, match="calibrated at 16 tokens x 64 channels"):
        get_method("fora").schedule(EOC_STEPS, DEPTH, {"eoc": str(eoc_prior)}, num_tokens=64)
    with pytest.raises(graphcache.GraphcacheError, match="needs eoc=PRIOR"):
        get_method("toca").resolve_options({"eoc_lambda": "0.5"})


def _prior(b, c):
    trend = torch.full((len(b), 1, 1), 0.5)
    meta = {"branches": {"b0_mlp": 0}, "steps": list(range(1, len(b) + 1))}
    return Prior(meta, {"b0_mlp": trend}, {"b0_mlp": torch.tensor(b)}, {"b0_mlp": torch.tensor(c)})


def test_judgment_and_fitted_weights():
    """Per step the error changes by λ² c - 2 λ b: a step is corrected where that is negative; the
    fitted λ is b / c where positive, or of either sign."""
    prior = _prior([1.0, -1.0, 0.004, 0.0], [10.0, 10.0, 1.0, 0.0])
    weights = lambda lam, judgment: list(step_weights(prior, "b0_mlp", lam, judgment).values())  # noqa: E731
    assert weights(0.01, "held-out") == [0.01, 0.0, 0.0, 0.0]
    assert weights(0.01, "all") == [0.01] * 4
    assert weights("fit", "held-out") == pytest.approx([0.1, 0.0, 0.004, 0.0])
    assert weights("signed-fit", "held-out") == pytest.approx([0.1, -0.1, 0.004, 0.0])
    # consecutive cached steps multiply their factors; a computed step starts over
    factors = step_factors(prior, [{"b0_mlp"}, set(), set(), {"b0_mlp"}, set()], 0.01, "all")
    assert [sorted(f) for f in factors] == [[], ["b0_mlp"], ["b0_mlp"], [], ["b0_mlp"]]
    assert factors[2]["b0_mlp"].item() == pytest.approx(1.005**2)


def test_cli_calibrate(eoc_model, tmp_path, capsys):
    out = tmp_path / "prior.safetensors"
    assert main(["calibrate", "builtin:dit-tiny-random", "--method", "eoc", "--steps", "3", "--samples", "1",
                 "--held-out", "1", "--cfg-scale", "1", "-q", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert load_prior(out).meta["num_steps"] == 3
    for argv, message in [
        (["--steps", "3", "-o", str(tmp_path / "prior.pt")], "use a .safetensors file name"),
        (["--steps", "1", "-o", str(tmp_path / "p.safetensors")], "needs 2+ steps"),
    ]:
        assert main(["calibrate", "builtin:dit-tiny-random", "--method", "eoc", "-q", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["sample", "builtin:dit-tiny-random", "--method", "fora", "--steps", "4", "--set", f"eoc={out}",
                 "--labels", "1", "-q", "-o", str(tmp_path / "x.pt")]) == 2
    assert "calibrated for 3 sampling steps, not 4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fora_prior(eoc_model, tmp_path_factory):
    """The session prior's calibration, kept for FORA level 50 only."""
    path = tmp_path_factory.mktemp("eoc-fora") / "fora50.safetensors"
    calibrate(eoc_model, EOC_STEPS, samples=2, held_out=2, cfg_scale=None, for_method="fora",
              method_options={"level": 50}).save(path)
    return path


def test_prior_for_a_method_keeps_the_steps_its_schedule_reads(eoc_model, eoc_prior, fora_prior):
    full, small = load_prior(eoc_prior), load_prior(fora_prior)
    # FORA level 50 over 6 steps caches steps 1, 3, 5: of the 5 trends (steps 1-5) it keeps those 3
    assert full.steps == [1, 2, 3, 4, 5] and small.steps == [1, 3, 5]
    assert small.meta["for"] == {"method": "fora", "options": {"level": 50}}
    for br in full.trend:
        assert small.trend[br].shape == (3, TOKENS, HIDDEN)
        assert torch.equal(small.trend[br], full.trend[br][[0, 2, 4]])
    # measured on this model: the trends are nearly all of the file, so it takes about 3/5 of the space
    ratio = fora_prior.stat().st_size / eoc_prior.stat().st_size
    assert 0.55 < ratio < 0.65, ratio


def test_prior_for_a_method_gives_the_same_factors_and_outputs(eoc_model, eoc_prior, fora_prior):
    fora = get_method("fora")
    options = {"level": 50, "eoc_lambda": 3000.0, "eoc_judgment": "all"}
    want = fora.schedule(EOC_STEPS, DEPTH, {**options, "eoc": str(eoc_prior)}, TOKENS)
    got = fora.schedule(EOC_STEPS, DEPTH, {**options, "eoc": str(fora_prior)}, TOKENS)
    assert [p.corrected for p in got.steps] == [p.corrected for p in want.steps] and want.steps[1].corrected
    for g, w in zip(got.steps, want.steps):
        assert g.inputs.keys() == w.inputs.keys() and all(torch.equal(g.inputs[k], w.inputs[k]) for k in w.inputs)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(prior):
        model = graphcache.optimize(eoc_model, "fora", EOC_STEPS, eoc=str(prior), **options)
        return graphcache.sample(model, [1, 2], noise=noise, num_steps=EOC_STEPS, cfg_scale=None)

    assert torch.equal(run(fora_prior), run(eoc_prior))


def test_prior_for_a_method_refuses_a_schedule_reading_other_steps(fora_prior):
    # level 75 also caches step 2, which a level-50 prior does not store
    with pytest.raises(graphcache.GraphcacheError, match=r"stores steps 1, 3, 5 only .*reads step 2: calibrate "
                                                         r"again with --for fora"):
        get_method("fora").schedule(EOC_STEPS, DEPTH, {"level": 75, "eoc": str(fora_prior)}, TOKENS)


def test_cli_calibrate_for_a_method(tmp_path, capsys):
    out = tmp_path / "prior.safetensors"
    argv = ["calibrate", "builtin:dit-tiny-random", "--method", "eoc", "--steps", "4", "--samples", "1",
            "--held-out", "1", "--cfg-scale", "1", "-q", "-o", str(out)]
    assert main([*argv, "--for", "fora", "--set", "interval=3"]) == 0
    assert "keeps steps 1-2 (2 of 3)" in capsys.readouterr().out
    assert load_prior(out).steps == [1, 2]
    for extra, message in [(["--set", "interval=3"], "add --for METHOD"),
                           (["--for", "fora", "--set", "eoc_lambda=1"], "eoc_lambda is given where the prior is used"),
                           (["--for", "fora", "--set", "speed=3"], "has no option 'speed'"),
                           (["--for", "none"], "method none takes no eoc option")]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
