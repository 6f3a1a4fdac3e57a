"""graphcache.bench: timing, the bench report, and the `graphcache bench` command."""

from __future__ import annotations

import json
import statistics

import pytest

import graphcache
from graphcache.bench import time_sampling
from graphcache.errors import GraphcacheError
from graphcache.models.builtin import resolve_model

def test_time_sampling_median():
    cached = graphcache.optimize(resolve_model("builtin:dit-tiny-random"), "fora", 3)
    r = time_sampling(cached, labels=[1], num_steps=3, sampler="ddim", cfg_scale=1.5, repeats=3, warmup=1,
                      seed=0)
    assert set(r) == {"seconds", "all", "output"}
    assert len(r["all"]) == 3 and all(t > 0 for t in r["all"])
    assert r["seconds"] == statistics.median(r["all"])
    with pytest.raises(GraphcacheError):
        time_sampling(cached, labels=[1], num_steps=3, sampler="ddim", cfg_scale=1.5, repeats=0, warmup=0, seed=0)


@pytest.mark.parametrize("interleave, order", [
    (True, ["none", "fora", "toca"] * 3),  # built first, then rounds: warm-up, timed, timed
    (False, ["none"] * 3 + ["fora"] * 3 + ["toca"] * 3),  # one method at a time
])
def test_bench_runs_methods_in_rounds_or_one_at_a_time(monkeypatch, interleave, order):
    import graphcache.bench as bench_module

    calls, real = [], bench_module.sample

    def sample(cached, *args, **kwargs):
        calls.append(cached.method.name)
        return real(cached, *args, **kwargs)

    monkeypatch.setattr(bench_module, "sample", sample)
    report = bench_module.bench(resolve_model("builtin:dit-tiny-random"), [("fora", {}), ("toca", {})], num_steps=3,
                                repeats=2, warmup=1, interleave=interleave)
    assert calls == order and report["interleaved"] is interleave
    none, *rest = report["results"]
    assert [r["method"] for r in report["results"]] == ["none", "fora", "toca"]
    assert none["speedup"] == 1.0 and none["psnr"] is None
    for r in rest:
        assert len(r["seconds_all"]) == 2 and r["seconds"] == statistics.median(r["seconds_all"])
        rounds = [b / t for b, t in zip(none["seconds_all"], r["seconds_all"])]
        want = statistics.median(rounds) if interleave else none["seconds"] / r["seconds"]
        assert r["speedup"] == want and r["psnr"] is not None


@pytest.mark.parametrize("flag, interleaved", [(["--no-interleave"], False), (["--interleave"], True)])
def test_bench_cli_interleave_flag(tmp_path, flag, interleaved):
    from graphcache.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "builtin:dit-tiny-random", "--method", "fora", "--steps", "3", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--json", str(out), "-q", *flag]) == 0
    assert json.loads(out.read_text())["interleaved"] is interleaved


BENCH_FIELDS = {"method", "options", "seconds", "build_seconds", "speedup", "flops", "flops_speedup", "realization",
                "psnr", "ssim", "rel_l2", "accuracy", "fd", "peak_memory_bytes", "cache_bytes"}


def test_bench_cli_json_and_plots(tmp_path, capsys):

    from graphcache.cli import main
    from graphcache.methods import METHODS

    out = tmp_path / "bench.json"
    code = main(["bench", "builtin:dit-tiny-random", "--method", "all", "--steps", "4", "--batch", "2",
                 "--repeats", "1", "--warmup", "0", "--json", str(out), "--plot", str(tmp_path / "plots"), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"model", "backend", "steps", "batch", "results"} <= set(report)
    assert report["backend"] == "eager" and report["steps"] == 4 and report["batch"] == 2
    assert [r["method"] for r in report["results"]] == list(METHODS)  # none first, then every method
    for r in report["results"]:
        assert BENCH_FIELDS <= set(r)
        assert r["realization"] == r["speedup"] / r["flops_speedup"]
        assert r["accuracy"] is None and r["fd"] is None  # not an MNIST model
    none, fora = report["results"][0], report["results"][1]
    assert none["flops_speedup"] == 1.0 and none["cache_bytes"] == 0
    assert fora["flops_speedup"] > 1.0 and fora["cache_bytes"] > 0
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "frontier.png" in plots and len(plots) == 1 + len(METHODS)
    assert "realiz." in capsys.readouterr().out


def test_bench_cli_scoped_options(tmp_path):

    from graphcache.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "builtin:dit-tiny-random", "--method", "fora,toca", "--set", "fora.interval=2",
                 "--steps", "4", "--batch", "1", "--repeats", "1", "--warmup", "0", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    results = {r["method"]: r["options"] for r in report["results"]}
    assert results["fora"]["interval"] == 2 and results["toca"]["interval"] == 3
    assert report["interleaved"] is True  # eager, no interleave flag: interleaved unless told


def test_bench_cli_rejects_option_no_method_has(capsys):
    from graphcache.cli import main

    assert main(["bench", "builtin:dit-tiny-random", "--method", "fora", "--set", "clusters=3"]) == 2
    assert "clusters" in capsys.readouterr().err


def test_bench_text_conditioned_model_samples_in_its_pipeline():
    from diffusers_models import pixart_transformer

    from graphcache.bench import bench

    model = pixart_transformer()
    report = bench(model, [("toca", {})], num_steps=3, cfg_scale=4.5, repeats=1, warmup=0, text_tokens=5)
    assert report["sampler"] == "DPMSolverMultistepScheduler" and report["text_tokens"] == 5
    none, toca = report["results"]
    assert toca["options"]["profile"] == "pixart" and toca["flops_speedup"] > 1
    assert toca["rel_l2"] > 0 and none["rel_l2"] == 0  # scored against `none`'s latents
    with pytest.raises(GraphcacheError, match="sampler='ddpm' does not apply"):
        bench(model, [("fora", {})], num_steps=3, sampler="ddpm")


def test_bench_flux_folder_samples_in_its_pipeline(tmp_path, capsys):
    """A FLUX model folder through `graphcache bench`: FluxPipeline's flow-matching scheduler,
    embedded guidance 3.5 in a batch of 1 (FLOPs without a CFG batch), the image and text token
    counts asked for."""
    from diffusers_models import flux_transformer

    from graphcache.cli import main
    from graphcache.flops import block_flops, model_dims
    from graphcache.schedule import FULL

    model = flux_transformer()
    model.save_pretrained(tmp_path / "flux")
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "flux"), "--method", "none,fora", "--steps", "3", "--text-tokens", "5",
                 "--image-tokens", "16", "--repeats", "1", "--warmup", "0", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["sampler"] == "FlowMatchEulerDiscreteScheduler" and report["cfg_scale"] == 3.5
    assert (report["steps"], report["batch"], report["text_tokens"], report["image_tokens"]) == (3, 1, 5, 16)
    none, fora = report["results"]
    for r in report["results"]:
        assert BENCH_FIELDS <= set(r) and r["seconds"] > 0
        assert r["realization"] == r["speedup"] / r["flops_speedup"]
    dims = model_dims(model, text_tokens=5, tokens=16)
    assert dims["batch"] == 1
    assert none["flops"] == 3 * sum(block_flops(FULL, block=i, **dims) for i in range(4))  # 2 double + 2 single
    assert none["flops_speedup"] == 1.0 and none["psnr"] is None
    assert fora["flops_speedup"] > 1.0 and fora["psnr"] is not None and fora["rel_l2"] > 0
    assert "realiz." in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "flux"), "--image-tokens", "15"]) == 2
    assert "15 image tokens is not a square" in capsys.readouterr().err


def test_bench_refuses_text_conditioned_models_it_has_no_session_for():
    from diffusers_models import sd3_transformer

    from graphcache.bench import bench

    with pytest.raises(GraphcacheError, match="bench samples PixArt-α and FLUX in their pipelines, not a "
                                              "SD3Transformer2DModel"):
        bench(sd3_transformer(), [("fora", {})], num_steps=3, repeats=1, warmup=0)


def test_builtin_flux_has_flux_dev_widths_at_reduced_depth():
    """Checked on the config the builder passes (the model itself is 10 GB in fp32)."""
    from graphcache.models.builtin import BUILTINS, FLUX_DEV_4X8_CONFIG

    assert BUILTINS["flux-dev-4x8-random"].make is not None
    assert FLUX_DEV_4X8_CONFIG == dict(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
