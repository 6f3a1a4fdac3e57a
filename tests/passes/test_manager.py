"""PassManager: graph dumps around named passes, records with counters, culprit naming."""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.cache import CacheState
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.base import Pass, PassError, PassResult
from graphcache.passes.cache_passes import (
    EliminateDeadBranchesPass,
    InsertCacheWritePass,
    ReplaceWithCacheReadPass,
)
from graphcache.passes.manager import PassManager, PassPipelineError, PassRecord
from graphcache.runtime import new_variant

DEPTH = 2


@pytest.fixture(scope="module")
def captured():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
    return graphcache.capture(init_random_(DiT(cfg)))


def fora_reuse(blocks=None):
    return [InsertCacheWritePass(blocks=[]), ReplaceWithCacheReadPass(blocks=blocks), EliminateDeadBranchesPass()]


def test_dump_named_pass(captured, tmp_path):
    gm = new_variant(captured, CacheState())
    PassManager(fora_reuse(), dump_dir=tmp_path / "dumps", dump=("ReplaceWithCacheReadPass",))(gm)
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["01_ReplaceWithCacheReadPass_after.txt", "01_ReplaceWithCacheReadPass_before.txt"]
    before = (tmp_path / "dumps" / files[1]).read_text()
    after = (tmp_path / "dumps" / files[0]).read_text()
    assert "graphcache_cache" not in before
    assert after.count("get_attr[target=graphcache_cache.") == 2 * DEPTH
    # the dump is the graph as fx prints it: the replaced work is still there until DCE runs
    assert "blocks.0.attn.proj" in before and "blocks.0.attn.proj" in after


def test_dump_all_and_none(captured, tmp_path):
    gm = new_variant(captured, CacheState())
    PassManager(fora_reuse(), dump_dir=tmp_path, dump=("*",))(gm)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{i:02d}_{p}_{w}.txt" for i, p in enumerate(
        ["InsertCacheWritePass", "ReplaceWithCacheReadPass", "EliminateDeadBranchesPass"]) for w in ("before", "after"))
    dce_after = (tmp_path / "02_EliminateDeadBranchesPass_after.txt").read_text()
    assert "blocks.0.attn.proj" not in dce_after and "blocks.0.adaLN_modulation" in dce_after

    gm = new_variant(captured, CacheState())
    PassManager(fora_reuse(), dump_dir=tmp_path / "none", dump=("NoSuchPass",))(gm)
    assert not (tmp_path / "none").exists()
    gm = new_variant(captured, CacheState())
    PassManager(fora_reuse(), dump=("*",))(gm)  # no dump_dir: dumping is off


def test_records_carry_counters(captured):
    gm = new_variant(captured, CacheState())
    records = PassManager([InsertCacheWritePass(blocks=[0]), ReplaceWithCacheReadPass(blocks=[1]),
                           EliminateDeadBranchesPass()])(gm)
    assert all(isinstance(r, PassRecord) for r in records)
    assert [r.name for r in records] == [
        "InsertCacheWritePass", "ReplaceWithCacheReadPass", "EliminateDeadBranchesPass"]
    assert records[0].counters == {"cache_write": 2}
    assert records[1].counters == {"cache_read": 2}
    assert records[2].counters["removed_nodes"] > 0
    assert all(r.modified for r in records)
    assert all(r.declined == [] for r in records)
    # records are snapshots: a pass object reused later does not change them
    p = InsertCacheWritePass()
    first = PassManager([p])(new_variant(captured, CacheState()))
    PassManager([p])(gm)  # block 1 was replaced and eliminated: declined there
    assert first[0].counters == {"cache_write": 2 * DEPTH} and first[0].declined == []
    assert p.counters == {"cache_write": 2} and len(p.declined) == 2


def test_graph_is_recompiled_after_each_pass(captured):
    gm = new_variant(captured, CacheState())
    PassManager([InsertCacheWritePass()])(gm)
    assert "graphcache.cache_write" in gm.code


class FailingPass(Pass):
    def call(self, gm):
        raise PassError("precondition does not hold\nsecond line")


class BreakGraphPass(Pass):
    """Leaves a node using a value defined after it: fx's own lint must catch it."""

    def call(self, gm):
        nodes = list(gm.graph.nodes)
        first_op = next(n for n in nodes if n.op not in ("placeholder", "get_attr"))
        with gm.graph.inserting_before(first_op):
            gm.graph.call_function(torch.neg, (nodes[-2],))
        return PassResult(gm, True)


@pytest.mark.parametrize("bad", [FailingPass, BreakGraphPass])
def test_failure_names_pass_and_predecessors(captured, bad):
    gm = new_variant(captured, CacheState())
    with pytest.raises(PassPipelineError) as info:
        PassManager([InsertCacheWritePass(), EliminateDeadBranchesPass(), bad(), ReplaceWithCacheReadPass()])(gm)
    assert info.value.failed == bad.__name__
    assert info.value.before == ["InsertCacheWritePass", "EliminateDeadBranchesPass"]
    msg = str(info.value)
    assert msg.startswith(f"pass {bad.__name__} failed (")
    assert msg.endswith("passes run before it: InsertCacheWritePass, EliminateDeadBranchesPass")
    assert "\n" not in msg


def test_first_pass_failure_says_none_ran(captured):
    with pytest.raises(PassPipelineError, match="passes run before it: none"):
        PassManager([FailingPass()])(new_variant(captured, CacheState()))


class RaisesPass(Pass):
    """Raises an exception type the manager has no special case for."""

    def call(self, gm):
        raise ZeroDivisionError("division by zero in a pass")


def test_any_exception_names_the_pass(captured):
    gm = new_variant(captured, CacheState())
    with pytest.raises(PassPipelineError) as info:
        PassManager([InsertCacheWritePass(), RaisesPass()])(gm)
    assert info.value.failed == "RaisesPass" and info.value.before == ["InsertCacheWritePass"]
    assert isinstance(info.value.cause, ZeroDivisionError)
    assert str(info.value) == ("pass RaisesPass failed (division by zero in a pass); "
                               "passes run before it: InsertCacheWritePass")


def test_nested_managers_run_in_place_and_name_the_path(captured):
    gm = new_variant(captured, CacheState())
    inner = PassManager([ReplaceWithCacheReadPass(), EliminateDeadBranchesPass()], name="reuse")
    records = PassManager([InsertCacheWritePass(blocks=[]), inner])(gm)
    assert [r.name for r in records] == ["InsertCacheWritePass", "ReplaceWithCacheReadPass",
                                         "EliminateDeadBranchesPass"]
    assert records[1].counters == {"cache_read": 2 * DEPTH}  # the inner passes rewrote the outer graph

    gm = new_variant(captured, CacheState())
    failing = PassManager([EliminateDeadBranchesPass(), RaisesPass()], name="inner")
    with pytest.raises(PassPipelineError) as info:
        PassManager([InsertCacheWritePass(), failing])(gm)
    assert info.value.failed == "inner/RaisesPass"
    assert info.value.before == ["InsertCacheWritePass", "EliminateDeadBranchesPass"]
