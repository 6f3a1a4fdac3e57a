"""TransposeFewTokenLinearsPass: the linear layers of a selected-token branch computed as W·xᵀ.

A cached step runs its MLP on a few dozen token rows only (ToCa and DuCa: k fresh tokens per batch
row; ClusCa: one per cluster). On a CPU, MKL's GEMM computes `F.linear`'s x·Wᵀ for such a
handful of rows far below its full-step speed per row; the same product computed as W·xᵀ, an
(out, rows) result, runs faster at a few dozen rows and no slower at a few hundred.

`linear_token_columns` returns the (rows, out) transposed view of that product, so no copy is
made: GELU keeps the layout, and the next linear's xᵀ is then contiguous. The values are
F.linear's up to float rounding (MKL may sum the dot products in another order). So only the
linears InsertTokenSelectPass cloned onto the selected tokens (`ir.ON_SELECTED_TOKENS`) are
rewritten: full-width linears gain next to nothing and would cost the bit-exact plain path
(`none`, FORA's full steps) its exactness.

For eager runners only (exporters/eager.py `eager_runner`): compile and the exporters lower linears
themselves. The kernel falls back to F.linear off the CPU and for dtypes other than float32: the
layout's advantage comes from MKL's float32 CPU kernels and has not been established elsewhere.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir
from .base import Pass, PassResult


def linear_token_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as weight · xᵀ on CPU float32 (a transposed view)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    columns = x.reshape(-1, x.shape[-1]).t()
    out = torch.mm(weight, columns) if bias is None else torch.addmm(bias.unsqueeze(1), weight, columns)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])


class TransposeFewTokenLinearsPass(Pass):
    """Every linear on the selected tokens calls `linear_token_columns`; linears on all tokens are
    left as they are."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if not node.meta.get(ir.ON_SELECTED_TOKENS) or not ir.is_linear(node):
                continue
            if set(node.kwargs) - {"bias"}:
                self.decline(node.name, f"a linear with keyword arguments {sorted(node.kwargs)}")
                continue
            node.target = linear_token_columns
            self.counters["linear"] += 1
        gm.recompile()
        return PassResult(gm, bool(self.counters))
