"""Backends for a CachedModel's variants (the interface: exporters/base.py).

`eager` runs a copy of each variant with its cache ops as their kernels (exporters/eager.py);
`compile` runs each under torch.compile, once per variant, fullgraph (exporters/compile.py); the
ahead-of-time backends `aoti`, `onnx` and `tensorrt` export each variant's functional form and
run the files (exporters/export.py).
"""

from __future__ import annotations

from ..errors import GraphcacheError
from .base import Backend, Runners

BACKENDS = ("eager", "compile", "aoti", "onnx", "tensorrt")


def get_backend(name: str, compile_options: dict | None = None) -> Backend:
    """The backend called `name`; `compile_options` (validated here) only for "compile"."""
    if name not in BACKENDS:
        raise GraphcacheError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if compile_options and name != "compile":
        raise GraphcacheError(f"compile_options need backend='compile' (backend is {name!r})")
    if name == "eager":
        from .eager import EagerBackend

        return EagerBackend()
    if name == "compile":
        from .compile import CompileBackend

        return CompileBackend(compile_options)
    from .export import AheadOfTimeBackend

    return AheadOfTimeBackend(name)


__all__ = ["BACKENDS", "Backend", "Runners", "get_backend"]
