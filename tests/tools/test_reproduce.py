"""Smoke test of the reproduction script on the tiny builtin model (the real run is by hand)."""

import json
import runpy
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "reproduce.py"


def test_reproduce_writes_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(TOOL), "--models", "builtin:dit-tiny-random", "--methods", "fora,toca",
                                      "--steps", "4", "--repeats", "1", "--out", str(tmp_path)])
    try:
        runpy.run_path(str(TOOL), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    reports = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in reports[0]["results"]] == ["none", "fora", "toca"]
    none = reports[0]["results"][0]
    assert none["speedup"] == 1.0 and none["rel_l2"] == 0.0 and none["flops_speedup"] == 1.0
    for r in reports[0]["results"]:
        assert r["realization"] == r["speedup"] / r["flops_speedup"]
    table = (tmp_path / "table.md").read_text()
    assert table.count("| builtin:dit-tiny-random |") == 3
