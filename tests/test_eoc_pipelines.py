"""EOC's prior calibrated through diffusers pipelines (graphcache/calibration.py
`calibrate_pipeline`): DiT from class labels with DDIM, PixArt-α from prompt embeddings with
DPM-Solver and guidance in one batch, every weight random; the prior is then used by
`graphcache.enable(pipe, "fora", eoc=PRIOR)`. Each capture costs seconds: every test builds few."""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.calibration import calibrate_pipeline
from graphcache.cli import main
from graphcache.diffusers_models import load_pipeline
from graphcache.eoc import load_prior
from diffusers_models import dit_pipeline, dit_transformer, pixart_pipeline, run_pipeline

STEPS = 4  # FORA's default interval 3 reuses steps 1 and 2: the steps EOC corrects


def _fora_run(pipe, **options):
    graphcache.enable(pipe, "fora", **options)
    try:
        return run_pipeline(pipe, STEPS)
    finally:
        graphcache.disable(pipe)


def _equal(a, b) -> bool:
    (out_a, pred_a), (out_b, pred_b) = a, b
    return torch.equal(out_a, out_b) and len(pred_a) == len(pred_b) and all(map(torch.equal, pred_a, pred_b))


def test_dit_pipeline_prior_corrects_fora_and_serves_its_model_only(tmp_path):
    """Calibrated on class labels with the pipeline's DDIM and guidance; FORA with the fitted λ
    differs from plain FORA (λ=0 is checked on PixArt-α: each run costs a capture)."""
    pipe = dit_pipeline()
    prior = calibrate_pipeline(pipe, STEPS, samples=2, held_out=1)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"  # the recording transformer is gone
    m = prior.meta
    assert (m["sampler"], m["pipeline"], m["cfg_scale"], m["num_steps"]) == ("DDIMScheduler", "DiTPipeline", 4.0, 4)
    assert (m["num_tokens"], m["samples"], m["held_out"]) == (16, 2, 1)
    assert sorted(prior.trend) == ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]
    path = prior.save(tmp_path / "dit.safetensors")
    assert not _equal(_fora_run(pipe, eoc=str(path), eoc_lambda="fit", eoc_judgment="all"), _fora_run(pipe))

    other = dit_pipeline()
    other.transformer = dit_transformer(seed=5)
    with pytest.raises(graphcache.GraphcacheError, match="calibrated on another model") as error:
        graphcache.enable(other, "fora", eoc=str(path))
    assert "\n" not in str(error.value)
    assert type(other.transformer).__name__ == "DiTTransformer2DModel"  # refused before anything is replaced


def test_pixart_pipeline_folder_calibrates_from_prompt_embeddings(tmp_path, capsys):
    """The CLI on a saved PixArt-α pipeline folder: three prompts, two calibrate and one is held
    out, guidance 4.5 on negative embeddings. FORA with the prior at eoc_lambda=0 is plain FORA bit
    for bit; the fitted λ changes it."""
    from safetensors.torch import save_file

    pixart_pipeline().save_pretrained(tmp_path / "pixart")
    g = torch.Generator().manual_seed(7)
    save_file({"prompt_embeds": torch.randn(3, 5, 24, generator=g)}, tmp_path / "prompts.safetensors")
    save_file({"prompt_embeds": torch.randn(1, 5, 24, generator=g)}, tmp_path / "negative.safetensors")
    path = tmp_path / "pixart.safetensors"
    assert main(["calibrate", str(tmp_path / "pixart"), "--method", "eoc", "--steps", str(STEPS), "--prompt-embeds",
                 str(tmp_path / "prompts.safetensors"), "--negative-embeds", str(tmp_path / "negative.safetensors"),
                 "-q", "-o", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    m = load_prior(path).meta
    assert (m["sampler"], m["cfg_scale"], m["samples"], m["held_out"]) == ("DPMSolverMultistepScheduler", 4.5, 2, 1)
    assert {"b0_cross_attention", "b1_cross_attention"} <= set(m["branches"])

    pipe = load_pipeline(tmp_path / "pixart")
    pipe.set_progress_bar_config(disable=True)
    plain = _fora_run(pipe)
    assert _equal(_fora_run(pipe, eoc=str(path), eoc_lambda="0"), plain)
    assert not _equal(_fora_run(pipe, eoc=str(path), eoc_lambda="fit", eoc_judgment="all"), plain)

    # another model's prior (its fingerprint) is refused by `sample` before the pipeline runs
    prior = load_prior(path)
    prior.meta["fingerprint"] = "0" * 32
    other = prior.save(tmp_path / "other.safetensors")
    embeddings = ["--prompt-embeds", str(tmp_path / "prompts.safetensors"), "--negative-embeds",
                  str(tmp_path / "negative.safetensors"), "-q"]
    assert main(["sample", str(tmp_path / "pixart"), "--method", "fora", "--steps", str(STEPS), "--set",
                 f"eoc={other}", *embeddings, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "calibrated on another model" in err and err.count("\n") == 1
    assert main(["calibrate", str(tmp_path / "pixart"), "--method", "eoc", "--steps", str(STEPS), "--samples", "3",
                 "--held-out", "1", *embeddings, "-o", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "3 calibration and 1 held-out prompts need 4 prompt embeddings, found 3" in err and err.count("\n") == 1
