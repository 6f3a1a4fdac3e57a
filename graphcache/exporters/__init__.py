"""Backends for a CachedModel's variants (DESIGN.md §7). `eager` needs nothing from here;
`compile` (torch.compile, every variant once, fullgraph) is `compile.compile_variants`; the
ahead-of-time backends `aoti`, `onnx` and `tensorrt` export each variant's functional form
(`export.install_runners`)."""

from __future__ import annotations

BACKENDS = ("eager", "compile", "aoti", "onnx", "tensorrt")

__all__ = ["BACKENDS"]
