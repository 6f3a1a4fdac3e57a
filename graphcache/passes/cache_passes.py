"""The FORA family of rewrites: write branch outputs to the cache, read them back instead of
computing, and drop the work nobody needs any more."""

from __future__ import annotations


from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, write_slot
from .base import BranchPass, Pass, PassResult


class InsertCacheWritePass(BranchPass):
    """After each selected branch's ungated output, write it to the branch's slot."""

    def call(self, gm):
        for br, out in self.branches(gm):
            if out is None:
                self.decline(br.name, "its output was already replaced (not computed in this variant)")
                continue
            declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
            with ir.insert_after(out):
                write_slot(gm.graph, br.name, out)
            self.count("cache_write", br)
        return PassResult(gm, self.counters["cache_write"] > 0)


class ReplaceWithCacheReadPass(BranchPass):
    """Replace each selected branch's ungated output by a read of its slot; the gate, the residual
    add and everything downstream stay, so the cached output is scaled by the CURRENT gate."""

    def call(self, gm):
        for br, out in self.branches(gm):
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
            self.count("cache_read", br)
        return PassResult(gm, self.counters["cache_read"] > 0)

    def ensures(self, gm):
        self.check_replaced(gm, "its cache read")


class EliminateDeadBranchesPass(Pass):
    """Dead-code elimination: the work of replaced branches goes; cache writes (mutating ops) stay."""

    def call(self, gm):
        before = len(gm.graph.nodes)
        ir.eliminate_dead_code(gm.graph)
        self.counters["removed_nodes"] = before - len(gm.graph.nodes)
        return PassResult(gm, self.counters["removed_nodes"] > 0)
