"""tools/realization_bound.py on the tiny builtin model: the accounting, not the machine's speed."""

import json

import graphcache
from graphcache.models.builtin import resolve_model

STEPS = 6


def test_bounds_count_full_steps_whole_and_cached_blocks_by_their_work(tmp_path, capsys, load_tool):
    out = tmp_path / "bound.json"
    assert load_tool("realization_bound").main(["--model", "builtin:dit-tiny-random", "--methods", "none,fora,duca",
                                                "--steps", str(STEPS), "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    full = report["full_step_seconds"]
    rows = {r["method"]: r for r in report["results"]}
    assert rows["none"]["seconds"] == STEPS * full and rows["none"]["realization_bound"] == 1.0
    model = resolve_model("builtin:dit-tiny-random")
    schedules = {name: graphcache.optimize(model, name, STEPS).schedule for name in ("fora", "duca")}
    for name, schedule in schedules.items():
        full_steps = sum(all(k == "full" for k in p.kinds) for p in schedule.steps)
        assert 0 < full_steps < STEPS
        r = rows[name]
        assert full_steps * full - 1e-12 <= r["seconds"] < STEPS * full
        assert r["realization_bound"] == r["speedup"] / r["flops_speedup"]
    fora = schedules["fora"]
    assert all(set(p.kinds) in ({"full"}, {"reuse"}) for p in fora.steps)
    # a reused block's only unavoidable work, its gates, is precomputed with the run's modulation
    assert abs(rows["fora"]["seconds"] - full_steps_of(fora) * full) < 1e-9
    assert "| fora |" in capsys.readouterr().out


def full_steps_of(schedule) -> int:
    return sum(all(k == "full" for k in p.kinds) for p in schedule.steps)
