"""The `aoti` backend: each variant's main graph as an AOTInductor package (`.pt2`).

`torch._inductor.aoti_compile_and_package` compiles the exported program ahead of time into a
shared library (C++ on CPU, Triton kernels on CUDA) inside a `.pt2` archive;
`torch._inductor.aoti_load_package` loads it without the model's Python code. The package is
tied to the torch version and device it was built for (the manifest records both).
"""

from __future__ import annotations

from pathlib import Path

import torch

SUFFIX = ".pt2"


def check(cached) -> None:
    """Nothing to check up front: AOTInductor ships with torch (it needs a C++ compiler on CPU)."""


def build(variant, path: Path) -> None:
    torch._inductor.aoti_compile_and_package(variant.main, package_path=str(path))


class Runner:
    """Calls a loaded package with tensors in `sig.inputs` order; returns its outputs in order."""

    def __init__(self, path: Path, sig, device):
        self.package = torch._inductor.aoti_load_package(str(path))

    def __call__(self, *tensors):
        # the compiled kernels assume the export's (contiguous) strides and do not check them;
        # Inductor may return an output (a cache value fed back next step) in another layout
        return self.package(*(t.contiguous() for t in tensors))


def versions() -> dict:
    return {}
