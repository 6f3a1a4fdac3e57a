"""The `aoti` backend: each variant's main graph as an AOTInductor package (`.pt2`).

`torch._inductor.aoti_compile_and_package` compiles the exported program ahead of time into a
shared library (C++ on CPU, Triton kernels on CUDA) inside a `.pt2` archive;
`torch._inductor.aoti_load_package` loads it without the model's Python code. The package is
tied to the torch version and device it was built for (the manifest records both).

The weights are not compiled into the packages (`package_constants_in_so=False`): every variant
of a model uses the same parameters, so each package is handed the same tensors at load time
(`load_constants(..., user_managed=True)`: the package keeps pointers, no copy). In-process these
are the model's own parameters; an artifact stores them once (weights.safetensors, see
exporters/export.py). N variants cost one model's memory and disk instead of N.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GraphcacheError

SUFFIX = ".pt2"
WEIGHTS_IN_MEMORY = True  # the runner is handed the weights as tensors (export.shared_weights)


def check(cached) -> None:
    """Nothing to check up front: AOTInductor ships with torch (it needs a C++ compiler on CPU)."""


def build(variant, path: Path, weights_file: Path) -> None:  # weights_file unused: tensors come at load
    torch._inductor.aoti_compile_and_package(variant.main, package_path=str(path),
                                             inductor_configs={"aot_inductor.package_constants_in_so": False})


class Runner:
    """Calls a loaded package with tensors in `sig.inputs` order; returns its outputs in order.

    weights: {constant name: tensor} holding at least the package's constants; they must outlive
    the runner (it keeps a reference) and are used in place.
    """

    def __init__(self, path: Path, sig, device, weights: dict):
        self.package = torch._inductor.aoti_load_package(str(path))
        names = self.package.get_constant_fqns()
        missing = [n for n in names if n not in weights]
        if missing:
            raise GraphcacheError(f"{path.name} needs weights the model does not have: {', '.join(missing[:3])}"
                                  + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        self.constants = {n: weights[n] for n in names}
        self.package.load_constants(self.constants, check_full_update=True, user_managed=True)

    def __call__(self, *tensors):
        # the compiled kernels assume the export's (contiguous) strides and do not check them;
        # Inductor may return an output (a cache value fed back next step) in another layout
        return self.package(*(t.contiguous() for t in tensors))


def versions() -> dict:
    return {}
