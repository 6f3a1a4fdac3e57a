"""Custom ops the passes insert.

Cache writes must survive dead-code elimination: fx treats `call_method` and module calls as pure,
so a plain `buf.copy_(x)` node would be deleted by `eliminate_dead_code()`. `cache_write` is a
custom op that declares its mutation, which fx (and torch.compile's functionalization) respect.
"""

from __future__ import annotations

import torch
import torch.fx as fx


@torch.library.custom_op("graphcache::cache_write", mutates_args=("dst",))
def cache_write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (same shape and dtype: the runtime allocates slots from the source's shape)."""
    dst.copy_(src)


@cache_write.register_fake
def _(dst, src):
    return None


CACHE_WRITE = torch.ops.graphcache.cache_write.default


def is_cache_write(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CACHE_WRITE


# Functions whose graph nodes draw from the global RNG, and ops that must run on the host (they
# synchronise, or no exporter can express them). Exporters move both out of the exported graph
# (passes/functionalize.py); modules that insert such nodes register their functions here.
RANDOM_FUNCTIONS: set = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
                         torch.randint_like}
HOST_OPS: set = set()


def random_function(fn):
    """Decorator: graph nodes calling `fn` draw random numbers (hoisted out by exporters)."""
    RANDOM_FUNCTIONS.add(fn)
    return fn
