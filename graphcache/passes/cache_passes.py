"""The FORA family of rewrites: write branch outputs to the cache, read them back instead of
computing, and drop the work nobody needs any more."""

from __future__ import annotations


from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, write_slot
from .base import Pass, PassError, PassResult


class InsertCacheWritePass(Pass):
    """After each selected branch's ungated output, write it to the branch's slot."""

    def __init__(self, blocks=None, kinds=None):
        """blocks: indices (None: all); kinds: branch kinds (None: all), e.g. (ir.ATTENTION,)."""
        super().__init__()
        self.blocks, self.kinds = blocks, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None:
                self.decline(br.name, "its output was already replaced (not computed in this variant)")
                continue
            declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
            with ir.insert_after(out):
                write_slot(gm.graph, br.name, out)
            self.counters["cache_write"] += 1
        return PassResult(gm, self.counters["cache_write"] > 0)


class ReplaceWithCacheReadPass(Pass):
    """Replace each selected branch's ungated output by a read of its slot; the gate, the residual
    add and everything downstream stay, so the cached output is scaled by the CURRENT gate."""

    def __init__(self, blocks=None, kinds=None):
        """blocks: indices (None: all); kinds: branch kinds (None: all), e.g. (ir.ATTENTION,)."""
        super().__init__()
        self.blocks, self.kinds = blocks, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None:
                self.decline(br.name, "its output is not in this graph")
                continue
            if not out.users:
                self.decline(br.name, "its output was already replaced (nothing uses it any more)")
                continue
            declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
            with ir.insert_after(out):
                cached = read_slot(gm.graph, br.name)
            out.replace_all_uses_with(cached)
            self.counters["cache_read"] += 1
        return PassResult(gm, self.counters["cache_read"] > 0)

    def ensures(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is not None and out.users:
                raise PassError(f"branch {br.name} output {out.name} is still used after its cache read")


class EliminateDeadBranchesPass(Pass):
    """Dead-code elimination: the work of replaced branches goes; cache writes (mutating ops) stay."""

    def call(self, gm):
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        self.counters["removed_nodes"] = before - len(gm.graph.nodes)
        return PassResult(gm, self.counters["removed_nodes"] > 0)
