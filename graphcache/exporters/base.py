"""What a backend is, written down.

A backend turns the variants of a CachedModel (built by the method's passes, graphcache/runtime.py)
into what runs them: `build(cached)` returns a `Runners`, one callable per variant key with the
model's forward signature plus the step's extra inputs, and whatever those callables need kept
alive. It never sets attributes on the model: the CachedModel keeps what it is given.

A new backend is one file: a class satisfying `Backend`, named in `exporters.BACKENDS`. A new
ahead-of-time format is one file too: a module satisfying `ExportFormat` (exporters/aoti.py,
exporters/onnx.py, exporters/tensorrt.py), which `AheadOfTimeBackend` (exporters/export.py) drives.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol


@dataclass
class Runners:
    """What a backend built for a CachedModel."""

    by_variant: dict[tuple, Callable]  # variant key -> the callable that replaces its GraphModule
    records: dict[tuple, list] = field(default_factory=dict)  # variant key -> PassRecords of passes run on its copy
    exported: list = field(default_factory=list)  # ahead of time: the ExportedVariants, in schedule.variants() order
    files: tempfile.TemporaryDirectory | None = None  # ahead of time: the directory holding the exported files
    weights: dict | None = None  # ahead of time: the tensors the files use in place
    compile_options: dict | None = None  # compile: the resolved torch.compile options


class Backend(Protocol):
    name: str
    # whether its variants may read values computed outside them from (t, y) (HoistConditioningPass)
    hoists_conditioning: bool

    def build(self, cached) -> Runners:
        """The runners of every variant of `cached` (a CachedModel whose variants are built)."""


class ExportFormat(Protocol):
    """A module that writes and runs one file per variant's functional main graph."""

    SUFFIX: str  # the file's suffix, e.g. ".onnx"
    WEIGHTS_IN_MEMORY: bool  # whether `Runner` is handed the weights as tensors (else the file references them)

    def check(self, cached) -> None:
        """Raise GraphcacheError, before anything is exported, when the format cannot run here."""

    def build(self, variant, path: Path, weights_file: Path) -> None:
        """Write the file of one ExportedVariant to `path` (the shared weights are at `weights_file`)."""

    def Runner(self, path: Path, sig, device, weights: dict | None) -> Callable:  # noqa: N802 (a class)
        """A callable taking `sig.inputs` in order and returning `sig.outputs` in order."""

    def versions(self) -> dict[str, Any]:
        """Versions of the libraries the files depend on (recorded in the manifest)."""


__all__ = ["Backend", "ExportFormat", "Runners"]
