"""CallCacheKernelsPass: each cache op of a runner copy calls its plain kernel (`ops.EAGER_KERNELS`).

On a CPU a custom op's dispatch costs more than the work of most cache writes of a small model,
so eager runners call the kernels directly. Only for runner copies that no dead-code elimination
runs on: the kernels' mutation is not declared, and only the ops keep their writes alive (the
variants keep the ops, for DCE, torch.compile and the exporters).
"""

from __future__ import annotations

import torch.fx as fx

from ..ops import EAGER_KERNELS
from .base import Pass, PassError, PassResult


def cache_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of `gm` that call a cache op (one with a kernel in `ops.EAGER_KERNELS`)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in EAGER_KERNELS]


class CallCacheKernelsPass(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in cache_ops(gm):
            node.target = EAGER_KERNELS[node.target]
            self.counters["kernel"] += 1
        return PassResult(gm, self.counters["kernel"] > 0)


def require_cache_kernels(gm: fx.GraphModule, pass_name: str) -> None:
    """PassError unless every cache op of `gm` already calls its kernel (CallCacheKernelsPass ran)."""
    left = cache_ops(gm)
    if left:
        raise PassError(f"{pass_name} rewrites the cache ops' kernels; {left[0].name} still calls "
                        f"{left[0].target}: run CallCacheKernelsPass first")
