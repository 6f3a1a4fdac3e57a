"""tools/versus_reference.py on the tiny builtin model: the agreement check and the accounting,
not the machine's speed."""

import json

import pytest

ARGS = ["--model", "builtin:dit-tiny-random", "--steps", "6", "--repeats", "2"]


def test_every_reference_agrees_and_the_ratios_are_the_medians(tmp_path, capsys, load_tool):
    out = tmp_path / "versus.json"
    tool = load_tool("versus_reference")
    assert tool.main([*ARGS, "--methods", "toca,duca,clusca,taylorseer", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["toca", "duca", "clusca", "taylorseer"]
    plain = report["uncached_seconds"]
    assert len(report["uncached_runs"]) == 2 and plain == sum(report["uncached_runs"]) / 2
    assert 0 < report["uncached_step_floor"] < min(report["uncached_runs"])
    for r in report["results"]:
        assert r["max_rel_difference"] <= 1e-5
        runs = r["runs"]
        assert len(runs["graphcache"]) == len(runs["reference"]) == 2
        assert r["graphcache_seconds"] == sum(runs["graphcache"]) / 2
        assert r["reference_over_graphcache"] == r["reference_seconds"] / r["graphcache_seconds"]
        # the step floor adds each model call's fastest time: under the fastest whole run
        for side in ("graphcache", "reference"):
            assert 0 < r[f"{side}_step_floor"] < min(runs[side])
        assert r["reference_over_graphcache_step_floor"] == r["reference_step_floor"] / r["graphcache_step_floor"]
        assert r["realization"]["reference"] == plain / r["reference_seconds"] / r["flops_speedup"]
        assert r["flops_speedup"] > 1
    assert report["results"][2]["options"]["clusters"] == 16  # graphcache's defaults, given to both sides
    assert "| clusca |" in capsys.readouterr().out


def test_a_reference_that_disagrees_stops_the_comparison(tmp_path, monkeypatch, capsys, load_tool):
    """Timing two runs that computed different things would compare nothing: status 1, no report."""
    tool = load_tool("versus_reference")
    right = tool.reference_for

    def every_step_full(method, dit, num_steps, options):
        return right(method, dit, num_steps, {**options, "interval": 1})

    monkeypatch.setattr(tool, "reference_for", every_step_full)
    out = tmp_path / "versus.json"
    assert tool.main([*ARGS, "--methods", "toca", "--json", str(out)]) == 1
    assert "disagree" in capsys.readouterr().err and not out.exists()


def test_methods_without_a_reference_are_refused(capsys, load_tool):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("versus_reference").main([*ARGS, "--methods", "toca,fora"])
    assert exit_info.value.code == 2 and "no reference for 'fora'" in capsys.readouterr().err
