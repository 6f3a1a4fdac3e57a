"""Cache slots: named tensors that variants of one model share across sampling steps.

A pass that needs state declares a `CacheSlot` on the graph it rewrites (shape and dtype given as
"like this node of the captured graph", optionally transformed), and reads/writes it through nodes
it creates: a `get_attr` of `graphcache_cache.<slot>` to read, the `cache_write` op to write (or
an in-place update such as `cache_scatter`, which overwrites some tokens).
The runtime owns one `CacheState` per model, allocates every declared slot for the actual input
shapes, and attaches the same `CacheState` to every variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .ops import CACHE_UPDATES, CACHE_WRITE

CACHE_ATTR = "graphcache_cache"
SLOTS_KEY = "graphcache_slots"


@dataclass(frozen=True)
class CacheSlot:
    name: str
    like: str  # node of the captured graph whose value has the slot's shape and dtype
    shape: Callable[[torch.Size], tuple] | None = None  # transform of that node's shape
    dtype: torch.dtype | None = None  # None: the node's dtype

    def resolve(self, node_meta) -> tuple[tuple[int, ...], torch.dtype]:
        shape = tuple(node_meta.shape)
        return (tuple(self.shape(torch.Size(shape))) if self.shape else shape), (self.dtype or node_meta.dtype)


def declare_slot(gm: fx.GraphModule, slot: CacheSlot) -> None:
    """Record the slot on the graph and give the attached CacheState an (empty) buffer of that
    name, so the graph lints before the runtime allocates real storage."""
    gm.meta.setdefault(SLOTS_KEY, {})[slot.name] = slot
    cache = getattr(gm, CACHE_ATTR, None)
    if cache is not None and slot.name not in cache._buffers:
        cache.register_buffer(slot.name, torch.empty(0), persistent=False)


def declared_slots(gm: fx.GraphModule) -> dict[str, CacheSlot]:
    return gm.meta.get(SLOTS_KEY, {})


def read_slot(graph: fx.Graph, name: str) -> fx.Node:
    """A node reading the live slot (insert it with graph.inserting_* at the right place)."""
    return graph.get_attr(f"{CACHE_ATTR}.{name}")


def slot_name(node) -> str | None:
    """The slot a `read_slot` node reads, or None for any other node (or value)."""
    prefix = f"{CACHE_ATTR}."
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.startswith(prefix):
        return node.target.removeprefix(prefix)
    return None


def write_slot(graph: fx.Graph, name: str, value: fx.Node) -> fx.Node:
    """Insert `cache_write(slot, value)` at the current insertion point, reading the slot first."""
    dst = read_slot(graph, name)
    return graph.call_function(CACHE_WRITE, (dst, value))


def update_slot(graph: fx.Graph, name: str, op, *args) -> fx.Node:
    """Insert the in-place update `op(slot, *args)` (an op of `ops.CACHE_UPDATES`, e.g.
    `CACHE_SCATTER` with (idx, values)) at the current insertion point; returns a read of the
    updated slot."""
    if op not in CACHE_UPDATES:
        raise ValueError(f"{op} is not a registered in-place cache update")
    graph.call_function(op, (read_slot(graph, name), *args))
    return read_slot(graph, name)


class CacheState(torch.nn.Module):
    """Holds the slot buffers (non-persistent: they never enter a state dict)."""

    def __init__(self):
        super().__init__()
        self.signature: tuple | None = None

    def allocate(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device, signature) -> None:
        for name in list(self._buffers):
            del self._buffers[name]
        for name, (shape, dtype) in specs.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.signature = signature

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
