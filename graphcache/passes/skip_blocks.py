"""Skipping whole blocks (DuCa's aggressive steps) and caching the stream they would produce.

A skipped block passes the stream on unchanged. When the last block is skipped the step reuses
the previous step's final hidden state instead, so only the final layer runs with the new
timestep. This is what DuCa's aggressive blocks do (Shenyi-Z/DuCa `DuCa-DiT/models.py`): at the
last layer the stream is replaced by that layer's output cached at the end of the previous step.
"""

from __future__ import annotations

from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, write_slot
from .base import Pass, PassResult

FINAL_STREAM_SLOT = "final_stream"


class SkipBlocksPass(Pass):
    """Route the stream around each selected block; the last block's output comes from the cache."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = sorted(blocks)

    def call(self, gm):
        structure = ir.structure_of(gm)
        nodes = ir.nodes_by_name(gm.graph)
        last = structure.depth - 1
        routed = {}  # stream_out of a skipped block -> what now stands for it
        for b in self.blocks:
            block = structure.blocks[b]
            out, inp = nodes[block.stream_out], nodes[block.stream_in]
            inp = routed.get(inp, inp)
            if b == last:
                declare_slot(gm, CacheSlot(FINAL_STREAM_SLOT, like=structure.stream_end))
                with ir.insert_after(out):
                    replacement = read_slot(gm.graph, FINAL_STREAM_SLOT)
                self.counters["final_stream_read"] += 1
            else:
                replacement = inp
            out.replace_all_uses_with(replacement)
            routed[out] = replacement
            self.counters["skipped_block"] += 1
        return PassResult(gm, bool(self.blocks))


class InsertFinalStreamWritePass(Pass):
    """Keep the last block's output for a later step that skips it."""

    def call(self, gm):
        structure = ir.structure_of(gm)
        end = ir.nodes_by_name(gm.graph)[structure.stream_end]
        if not end.users:
            self.decline("final stream", "the last block is skipped in this variant")
            return PassResult(gm, False)
        declare_slot(gm, CacheSlot(FINAL_STREAM_SLOT, like=structure.stream_end))
        with ir.insert_after(end):
            write_slot(gm.graph, FINAL_STREAM_SLOT, end)
        self.counters["final_stream_write"] += 1
        return PassResult(gm, True)
