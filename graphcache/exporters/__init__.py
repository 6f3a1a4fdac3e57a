"""Backends for a CachedModel's variants (DESIGN.md §7). `eager` needs nothing from here;
`compile` (torch.compile, every variant once, fullgraph) is `compile.compile_variants`."""

from __future__ import annotations

BACKENDS = ("eager", "compile")

__all__ = ["BACKENDS"]
