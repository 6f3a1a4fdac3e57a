"""Custom ops the passes insert.

Cache writes must survive dead-code elimination: fx treats `call_method` and module calls as pure,
so a plain `buf.copy_(x)` node would be deleted by `eliminate_dead_code()`. `cache_write` and the
in-place cache updates (`cache_scatter`, and those other modules register in `CACHE_UPDATES`) are
custom ops that declare their mutation, which fx (and torch.compile's functionalization) respect.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def copy_into_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[...] = src: `cache_write`'s kernel."""
    return dst.copy_(src)


@torch.library.custom_op("graphcache::cache_write", mutates_args=("dst",))
def cache_write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (same shape and dtype: the runtime allocates slots from the source's shape)."""
    copy_into_(dst, src)


@cache_write.register_fake
def _(dst, src):
    return None


def token_index(idx: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, k) token indices expanded to (B, k, channels), for gather/scatter along dim 1."""
    return idx.unsqueeze(-1).expand(-1, -1, channels)


def _rows(idx: torch.Tensor) -> torch.Tensor:
    """(B, 1) batch-row numbers: with idx, the advanced index of the tokens idx of each row."""
    return torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j]] -> (B, k, C)."""
    if torch.compiler.is_compiling():  # compile and export trace one gather node
        return torch.gather(x, 1, token_index(idx, x.shape[-1]))
    # eager: index_select copies whole rows of the flattened tokens; on CPU that beats advanced
    # indexing, and gather's per-element index by far
    batch, tokens, channels = x.shape
    flat = (idx + _rows(idx) * tokens).reshape(-1)
    return x.reshape(batch * tokens, channels).index_select(0, flat).view(batch, idx.shape[1], channels)


def gather_positions(table: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-token table broadcast against (B, …, N at `axis`, …) values — rotary cos/sin —
    taken at each batch row's selected tokens idx (B, k): (B, …, k, …)."""
    rows, k = idx.shape
    table = table.expand(rows, *table.shape[1:])
    shape = [1] * table.dim()
    shape[0], shape[axis] = rows, k
    index = idx.view(shape).expand(*table.shape[:axis], k, *table.shape[axis + 1:])
    return torch.gather(table, axis, index)


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, unique: bool = True) -> torch.Tensor:
    """base with base[b, idx[b, j]] = values[b, j] (out of place). Where idx repeats a token, the
    last j wins (scatter's CPU kernel walks dim 1 in order for every other index)."""
    return base.scatter(1, token_index(idx, base.shape[-1]), values)


def put_tokens_(dst: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, unique: bool = True) -> torch.Tensor:
    """`scatter_tokens` in place, for eager. Unique picks (ToCa's top-k) copy whole rows by
    index_put_, much faster than scatter_'s per-element index on CPU. Picks that may repeat a token
    (ClusCa's representatives: an empty cluster picks token 0) use scatter_ itself: index_put_
    leaves unspecified which duplicate wins (its CPU kernel may split the rows between threads),
    and the duplicates' values can differ by a rounding (the same token in two GEMM rows), so
    only scatter_ gives the values of the out-of-place form on every CPU."""
    if not unique:
        return dst.scatter_(1, token_index(idx, dst.shape[-1]), values)
    return dst.index_put_((_rows(idx), idx), values)


@torch.library.custom_op("graphcache::cache_scatter", mutates_args=("dst",))
def cache_scatter(dst: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, unique: bool = True) -> None:
    """`scatter_tokens` in place: (B, N, C) dst, (B, k) idx, (B, k, C) values; `unique` says that
    idx never repeats a token within a row. Updating k tokens of a slot this way touches k rows,
    instead of making a new (B, N, C) tensor and copying it. (The op is opaque to compile, and
    exporters replace it by `scatter_tokens`.)"""
    put_tokens_(dst, idx, values, unique)


@cache_scatter.register_fake
def _(dst, idx, values, unique=True):
    return None


CACHE_WRITE = torch.ops.graphcache.cache_write.default
CACHE_SCATTER = torch.ops.graphcache.cache_scatter.default

# In-place cache updates: each op `op(slot, *rest)` mutates the slot (its first argument) and maps
# to its out-of-place form `f(slot value, *rest) -> new value`, which FunctionalizeCachePass puts in
# its place (exported graphs mutate nothing). Modules that define such an op register it here.
CACHE_UPDATES: dict = {CACHE_SCATTER: scatter_tokens}

# Each cache op's kernel: the plain in-place function the op runs. Eager runners call these
# directly (exporters/eager.py `eager_runner`): on a CPU a custom op's dispatch costs more than
# the work of most cache writes of a small model. The variants keep the ops, whose declared
# mutation is what dead-code elimination, torch.compile and the exporters go by.
EAGER_KERNELS: dict = {CACHE_WRITE: copy_into_, CACHE_SCATTER: put_tokens_}


def is_cache_write(node: fx.Node) -> bool:
    """A node that writes a cache slot: all of it (`cache_write`), or in place (`CACHE_UPDATES`)."""
    return node.op == "call_function" and (node.target is CACHE_WRITE or node.target in CACHE_UPDATES)


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
