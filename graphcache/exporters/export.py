"""Ahead-of-time backends (aoti, onnx, tensorrt): export every variant, run the exported files.

For each variant of a CachedModel: `functionalize` it (passes/functionalize.py), `torch.export`
the pure main graph with dynamic batch and token-count dimensions, and hand the program to the
backend module (`aoti.build`, `onnx.build`, ...), which writes one file. The eager prologue
(random draws) and epilogue (K-means) are exported too (`torch.export.save`), so an artifact runs
without the model's Python code; in-process they run as the GraphModules they are.

Dynamic dimensions: dim 0 of every tensor input (the batch: x, t, y, cache slots and draws are
batch-major) is `Dim.AUTO`, exported at an example batch of 4; a token count `gc_tokens_b<i>`
(a `(k,)` tensor) is `Dim(min=0, max=N-1)`. `token_ranges` gives the k each variant actually
receives in the run (TensorRT profiles and the manifest use it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from ..capture import example_inputs, propagate_shapes
from ..errors import GraphcacheError
from ..passes.functionalize import CACHE_PREFIX, Signature, functionalize, placeholder_names
from ..schedule import is_token_input, step_inputs
from .functional import FunctionalRunner, ScalarTensors, step_tensor

AHEAD_OF_TIME = ("aoti", "onnx", "tensorrt")
EXAMPLE_BATCH = 4


def backend_module(backend: str):
    if backend not in AHEAD_OF_TIME:
        raise GraphcacheError(f"{backend!r} is not an ahead-of-time backend ({', '.join(AHEAD_OF_TIME)})")
    return importlib.import_module(f"{__package__}.{backend}")


def token_ranges(schedule, key) -> dict[str, list[int]]:
    """{token input: [min k, max k]} over the steps that run variant `key`."""
    ranges: dict[str, list[int]] = {}
    for plan in schedule.steps:
        if plan.variant != key:
            continue
        for name, k in step_inputs(plan).items():
            if is_token_input(name):
                lo, hi = ranges.get(name, [k, k])
                ranges[name] = [min(lo, k), max(hi, k)]
    return ranges


def first_scalars(schedule, key) -> dict:
    """The per-step scalars (not token counts) of the first step that runs variant `key`."""
    plan = next(p for p in schedule.steps if p.variant == key)
    return {n: v for n, v in step_inputs(plan).items() if not is_token_input(n)}


@dataclass
class ExportedVariant:
    index: int
    sig: Signature
    main: torch.export.ExportedProgram
    prologue: torch.export.ExportedProgram | None
    epilogue: torch.export.ExportedProgram | None
    token_ranges: dict[str, list[int]]


def _dynamic_shapes(names, values, num_tokens: int) -> dict:
    shapes = {}
    for name, value in zip(names, values):
        if is_token_input(name):
            shapes[name] = {0: Dim(name, min=0, max=num_tokens - 1)}
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            shapes[name] = {0: Dim.AUTO}
        else:
            shapes[name] = None
    return shapes


def _export(gm, names, env, num_tokens) -> torch.export.ExportedProgram:
    values = tuple(env[n] for n in names)
    try:
        return torch.export.export(gm, values, dynamic_shapes=_dynamic_shapes(names, values, num_tokens))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraphcacheError(f"torch.export failed on a variant: {first}") from e


def export_variants(cached) -> list[ExportedVariant]:
    """torch.export every variant of `cached` (in `cached.schedule.variants()` order)."""
    n = cached.structure.num_tokens
    args = example_inputs(cached.model, batch=EXAMPLE_BATCH)
    propagate_shapes(cached.captured, args)
    specs = cached.slot_specs()
    for slot, (shape, _) in specs.items():
        if not shape or shape[0] != EXAMPLE_BATCH:
            raise GraphcacheError(f"cache slot {slot} of shape {shape} is not batch-major: it cannot be exported")
    scalars = ScalarTensors()
    device = args[0].device
    exported = []
    rng = torch.get_rng_state()  # the example prologue draws must not shift the user's RNG
    try:
        for index, key in enumerate(cached.schedule.variants()):
            main, sig = functionalize(cached.variants[key])
            ranges = {k: r for k, r in token_ranges(cached.schedule, key).items() if k in sig.inputs}
            too_many = {name: hi for name, (_, hi) in ranges.items() if hi >= n}
            if too_many:
                raise GraphcacheError(f"token count {too_many} reaches all {n} tokens: such a partial step "
                                      "cannot be exported (use a smaller fresh ratio)")
            env = dict(zip(cached.structure.input_names, args))
            env.update({name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in
                        ((CACHE_PREFIX + s, spec) for s, spec in specs.items())})
            env.update({name: step_tensor(name, v, device, scalars) for name, v in first_scalars(cached.schedule,
                                                                                                key).items()})
            env.update({name: torch.empty(max(2, min(hi, n - 1)), device=device) for name, (_, hi) in ranges.items()})
            prologue = epilogue = None
            if sig.prologue is not None:
                names = placeholder_names(sig.prologue.graph)
                prologue = _export(sig.prologue, names, env, n)
                env.update(zip(sig.prologue_outputs, sig.prologue(*(env[k] for k in names))))
            program = _export(main, sig.inputs, env, n)
            if sig.epilogue is not None:
                env.update(zip(sig.outputs, main(*(env[k] for k in sig.inputs))))
                epilogue = _export(sig.epilogue, placeholder_names(sig.epilogue.graph), env, n)
            exported.append(ExportedVariant(index, sig, program, prologue, epilogue, ranges))
    finally:
        torch.set_rng_state(rng)
    return exported


def variant_files(index: int, suffix: str) -> dict[str, str]:
    return {"main": f"v{index}{suffix}", "prologue": f"v{index}_prologue.pt2", "epilogue": f"v{index}_epilogue.pt2"}


def build_files(cached, backend: str, directory: Path) -> list[ExportedVariant]:
    """Export every variant of `cached` into `directory` with `backend`'s builder."""
    module = backend_module(backend)
    directory.mkdir(parents=True, exist_ok=True)
    variants = export_variants(cached)
    for v in variants:
        files = variant_files(v.index, module.SUFFIX)
        module.build(v.main, directory / files["main"], v.sig)
        if v.prologue is not None:
            torch.export.save(v.prologue, directory / files["prologue"])
        if v.epilogue is not None:
            torch.export.save(v.epilogue, directory / files["epilogue"])
    return variants


def install_runners(cached, backend: str, directory: Path) -> None:
    """Build the files and make `cached` run them: one FunctionalRunner per variant key."""
    module = backend_module(backend)
    variants = build_files(cached, backend, directory)
    device = next(cached.model.parameters()).device
    keys = cached.schedule.variants()
    cached.exported = variants
    cached.runners = {
        keys[v.index]: FunctionalRunner(v.sig, module.Runner(directory / variant_files(v.index, module.SUFFIX)["main"],
                                                             v.sig, device),
                                        cached.cache, cached.structure.input_names)
        for v in variants
    }


__all__ = ["AHEAD_OF_TIME", "ExportedVariant", "backend_module", "build_files", "export_variants",
           "install_runners", "token_ranges", "variant_files"]
