"""MakeStreamContiguousPass: give the residual stream a row-major layout before the first block.

DiT's patch embedding ends with `flatten(2).transpose(1, 2)`, so the (B, N, C) stream is a
transposed view (strides (N·C, 1, N)), and elementwise ops keep the layout of their first operand:
the stream stays transposed through every block. Each residual add then mixes a transposed and a
row-major operand, and on a CPU that strided walk is several times slower than a row-major add
(it defeats sequential, vectorised memory access), two adds per block every step. Uncached steps
hide it behind the GEMMs; cached steps, which are mostly such elementwise work, do not. One copy
of the stream up front makes every later add row-major.
Values are unchanged: elementwise ops do not depend on layout, and layer norms and linear layers
read a row-major copy of a strided input anyway.
"""

from __future__ import annotations

import torch

from .. import ir
from .base import Pass, PassResult


class MakeStreamContiguousPass(Pass):
    def call(self, gm):
        stream = ir.nodes_by_name(gm.graph).get(ir.structure_of(gm).stream_start)
        if stream is None or not stream.users:
            self.decline("stream", "the stream entering the first block is not used in this variant")
            return PassResult(gm, False)
        meta = stream.meta.get("tensor_meta")  # ShapeProp's: memory_format is None for a strided view
        if meta is None or meta.memory_format == torch.contiguous_format:
            self.decline(stream.name, "the stream is already row-major")
            return PassResult(gm, False)
        users = list(stream.users)
        with ir.insert_after(stream):
            contiguous = gm.graph.call_method("contiguous", (stream,))
        for user in users:
            user.replace_input_with(stream, contiguous)
        self.counters["contiguous"] += 1
        return PassResult(gm, True)

