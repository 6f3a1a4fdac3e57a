"""Smoke test of tools/gpu_bench.py on the CPU (the real run is on a GPU, by hand): its cells,
JSON and table, and the time budget that skips cells instead of overrunning."""

import json


def test_gpu_bench_quick_writes_every_cell(tmp_path, load_tool, capsys):
    tool = load_tool("gpu_bench")
    out = tmp_path / "g.json"
    code = tool.main(["--quick", "--compiler", "aot_eager", "--methods", "fora", "--steps", "3", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["finished"] and doc["settings"]["dtype"] == "fp32" and doc["machine"]["device"] == "cpu"
    eager, compiled, cudagraphs = doc["backends"]
    assert [b["label"] for b in doc["backends"]] == ["eager", "compile", "reduce-overhead"]
    for backend in (eager, compiled):
        assert [r["method"] for r in backend["results"]] == ["none", "fora"] and not backend["failed"]
        none, fora = backend["results"]
        assert none["speedup"] == 1.0 and len(fora["seconds_all"]) == 2
        assert fora["realization"] == fora["speedup"] / fora["flops_speedup"]
        assert fora["images_per_s"] == 2 / fora["seconds"] and fora["psnr_vs_eager_none"] is not None
        assert fora["graph_breaks"] == 0
    assert eager["results"][0]["psnr_vs_eager_none"] is None  # the reference itself
    assert [r["compilations"] for r in compiled["results"]] == [1, 2]  # one per variant, in the warm-up
    assert all(r["compilations_timed"] == 0 for r in compiled["results"])  # none in the timed runs
    assert cudagraphs["results"] == [] and len(cudagraphs["skipped"]) == 2  # needs inductor
    assert doc["table"].count("| eager |") == 2 and "| compile | fora |" in doc["table"]
    assert "| compile | fora |" in capsys.readouterr().out


def test_gpu_bench_budget_skips_cells(tmp_path, load_tool):
    tool = load_tool("gpu_bench")
    out = tmp_path / "g.json"
    # a budget already spent: no cell starts, and the report says why
    assert tool.main(["--quick", "--methods", "fora", "--steps", "3", "--backends", "eager,compile",
                      "--budget", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["finished"] and [b["results"] for b in doc["backends"]] == [[], []]
    for backend in doc["backends"]:
        none, fora = backend["skipped"]
        assert none["method"] == "none" and "time budget" in none["reason"]
        assert fora["method"] == "fora" and "no baseline" in fora["reason"]
