"""The `eager` backend: each variant runs as a GraphModule, copied and rewritten for eager speed.

A runner is a copy of the variant's graph over the same modules (weights never copied) on which
passes that only pay off without a compiler run, through one PassManager:

* `CallCacheKernelsPass`: each cache op calls its kernel (no custom-op dispatch);
* `UpdateTaylorFactorsInPlacePass`: Taylor factors refreshed in place (after the kernels);
* `ReuseDeadTemporariesPass`: elementwise ops computed into their dead operands;
* `TransposeFewTokenLinearsPass`: the selected tokens' linears as W·xᵀ.

Safe because no dead-code elimination runs on a runner: none will drop a kernel call whose
result nobody reads. Compile and the exporters take the variants themselves.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from ..passes.cache_kernels import CallCacheKernelsPass
from ..passes.few_token_linears import TransposeFewTokenLinearsPass
from ..passes.manager import PassManager, PassRecord
from ..passes.reuse_temporaries import ReuseDeadTemporariesPass
from ..passes.taylor import UpdateTaylorFactorsInPlacePass
from .base import Runners


def rewritten_copy(gm: fx.GraphModule, passes: list) -> tuple[fx.GraphModule, list[PassRecord]]:
    """A copy of `gm`'s graph over `gm` itself (new nodes, their meta shared), rewritten by `passes`,
    and what each pass did."""
    runner = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    records = PassManager(passes)(runner)
    # GraphModule copies only what the graph names, under new parent modules; share the variant's
    # own children instead, so slots the cache (re-)allocates later are the ones the runner reads
    for name, child in gm.named_children():
        setattr(runner, name, child)
    return runner, records


def with_cache_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with only `CallCacheKernelsPass` applied."""
    return rewritten_copy(gm, [CallCacheKernelsPass()])[0]


def eager_runner(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[PassRecord]]:
    """The runner of variant `gm` for eager runs, and what each of its passes did."""
    return rewritten_copy(gm, [CallCacheKernelsPass(), UpdateTaylorFactorsInPlacePass(), ReuseDeadTemporariesPass(),
                               TransposeFewTokenLinearsPass()])


class EagerBackend:
    name = "eager"
    hoists_conditioning = True

    def build(self, cached) -> Runners:
        runners, records = {}, {}
        for key, gm in cached.variants.items():
            runners[key], records[key] = eager_runner(gm)
        return Runners(runners, records=records)


__all__ = ["EagerBackend", "eager_runner", "rewritten_copy", "with_cache_kernels"]
