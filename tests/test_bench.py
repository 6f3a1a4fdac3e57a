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
