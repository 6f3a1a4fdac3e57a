"""graphcache.bench and the tools/bench_foundation.py script (in its quick mode)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

import graphcache
from graphcache.bench import time_sampling
from graphcache.errors import GraphcacheError
from graphcache.models.builtin import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_time_sampling_median():
    cached = graphcache.optimize(resolve_model("builtin:dit-tiny-random"), "fora", 3)
    r = time_sampling(cached, labels=[1], num_steps=3, sampler="ddim", cfg_scale=1.5, repeats=3, warmup=1,
                      seed=0)
    assert set(r) == {"seconds", "all"}
    assert len(r["all"]) == 3 and all(t > 0 for t in r["all"])
    assert r["seconds"] == statistics.median(r["all"])
    with pytest.raises(GraphcacheError):
        time_sampling(cached, labels=[1], num_steps=3, sampler="ddim", cfg_scale=1.5, repeats=0, warmup=0, seed=0)


def _tool():
    spec = importlib.util.spec_from_file_location("bench_foundation", ROOT / "tools" / "bench_foundation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_foundation_quick_mode(tmp_path, capsys):
    # The quick mode is `--model-size DiT-S/2 --steps 5 --repeats 1`; a smaller latent keeps it
    # to seconds on a slow shared CPU.
    out = tmp_path / "bench.json"
    code = _tool().main(["--model-size", "DiT-S/2", "--steps", "5", "--repeats", "1", "--input-size", "8", "--warmup", "0",
                         "--device", "cpu", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "none" in table and "fora interval=3" in table and "speedup" in table
    report = json.loads(out.read_text())
    assert report["model"] == "DiT-S/2" and report["steps"] == 5 and report["repeats"] == 1
    methods = {r["method"]: r for r in report["results"]}
    assert set(methods) == {"none", "fora"}
    assert methods["none"]["speedup"] == 1.0
    assert methods["fora"]["options"] == {"interval": 3} and methods["fora"]["seconds"] > 0
