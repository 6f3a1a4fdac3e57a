"""Ahead-of-time backends (aoti, onnx, tensorrt): export every variant, run the exported files.

For each variant of a CachedModel: `functionalize` it (passes/functionalize.py), `torch.export`
the pure main graph with dynamic batch and token-count dimensions, and hand the program to the
backend module (`aoti.build`, `onnx.build`, ...), which writes one file. The eager prologue
(random draws) and epilogue (K-means) are exported too (`torch.export.save`), so an artifact runs
without the model's Python code; in-process they run as the GraphModules they are.

Dynamic dimensions: dim 0 of every tensor input (the batch: x, t, y, cache slots and draws are
batch-major) is `Dim.AUTO`, exported at a batch of 4 (the inputs the model was captured on, rows
repeated: `capture.with_batch`), except the model inputs that have no batch (FLUX's token
positions: `CachedModel.unbatched_inputs`), which stay static; a token count `gc_tokens_b<i>`
(a `(k,)` tensor) is `Dim(min=0, max=N-1)` (a cross-attention's: min 2, `schedule.compiled_token_count`). `token_ranges` gives the k each variant actually
receives in the run (TensorRT profiles and the manifest use it). An EOC factor
`gc_eoc_<branch>` (tokens, channels) is not batch-major: its shape is static.

Weights are stored once for all variants: `shared_weights` collects every constant of every
variant's program, by name, once, and `build_files` writes them as `WEIGHTS_FILE` before
building the files. AOTInductor packages leave them out and take the tensors at load time
(`WEIGHTS_IN_MEMORY`: in-process the model's own parameters, from an artifact the loaded file);
ONNX files reference the file as external data.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config  # noqa: F401 (backed_size_oblivious)
from torch.export import Dim

from ..capture import propagate_shapes, with_batch
from ..errors import GraphcacheError
from ..passes.functionalize import CACHE_PREFIX, Signature, functionalize
from ..schedule import compiled_token_count, is_correction_input, is_token_input, step_inputs, token_input_stream
from .base import Runners
from .functional import FunctionalRunner, ScalarTensors, step_tensor

AHEAD_OF_TIME = ("aoti", "onnx", "tensorrt")
WEIGHTS_FILE = "weights.safetensors"  # shared by the variants
EXAMPLE_BATCH = 4


def backend_module(backend: str):
    if backend not in AHEAD_OF_TIME:
        raise GraphcacheError(f"{backend!r} is not an ahead-of-time backend ({', '.join(AHEAD_OF_TIME)})")
    return importlib.import_module(f"{__package__}.{backend}")


def token_ranges(schedule, key) -> dict[str, list[int]]:
    """{token input: [min k, max k]} over the steps that run variant `key`."""
    ranges: dict[str, list[int]] = {}
    for plan in schedule.steps_of(key):
        for name, k in step_inputs(plan).items():
            if is_token_input(name):
                k = compiled_token_count(name, k)
                lo, hi = ranges.get(name, [k, k])
                ranges[name] = [min(lo, k), max(hi, k)]
    return ranges


def first_scalars(schedule, key) -> dict:
    """The per-step scalars and tensors (not token counts) of the first step that runs variant `key`."""
    plan = schedule.steps_of(key)[0]
    return {n: v for n, v in step_inputs(plan).items() if not is_token_input(n)}


@dataclass
class ExportedVariant:
    index: int
    sig: Signature
    main: torch.export.ExportedProgram
    prologue: torch.export.ExportedProgram | None
    epilogue: torch.export.ExportedProgram | None
    token_ranges: dict[str, list[int]]


def token_limits(structure) -> dict[str, int]:
    """The token count of each stream, which bounds the counts of the token-count inputs that
    select from it (`schedule.token_input_stream`)."""
    return {st.name: st.num_tokens for st in structure.streams}


def _limit(limits: dict[str, int], name: str) -> int:
    return limits[token_input_stream(name)]


def _dynamic_shapes(names, values, limits: dict[str, int], unbatched: set[str]) -> dict:
    """Token counts (below their stream's token count, `token_limits`) and the batch (dim 0 of
    every tensor but EOC's factors and the model inputs in `unbatched`) dynamic."""
    shapes = {}
    for name, value in zip(names, values):
        if is_token_input(name):
            shapes[name] = {0: Dim(name, min=compiled_token_count(name, 0), max=_limit(limits, name) - 1)}
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and not is_correction_input(name) \
                and name not in unbatched:
            shapes[name] = {0: Dim.AUTO}
        else:
            shapes[name] = None
    return shapes


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's own FutureWarnings about pytree specs, printed while it exports, pickles
    and packages programs (nothing a user of graphcache can act on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _export(gm, names, env, limits, unbatched) -> torch.export.ExportedProgram:
    values = tuple(env[n] for n in names)
    try:
        # size-oblivious: a batch of 2 rows gives rand(batch // 2 = 1, N) in ToCa's random score,
        # which must not become a guard "batch // 2 != 1"
        with quiet_torch(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(gm, values, dynamic_shapes=_dynamic_shapes(names, values, limits, unbatched))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraphcacheError(f"torch.export failed on a variant: {first}") from e


def export_variants(cached) -> list[ExportedVariant]:
    """torch.export every variant of `cached` (in `cached.schedule.variants()` order)."""
    limits = token_limits(cached.structure)
    args = with_batch(cached.capture_inputs, EXAMPLE_BATCH, cached.spec.symbolic_batch)
    unbatched = cached.unbatched_inputs
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
            too_many = {name: hi for name, (_, hi) in ranges.items() if hi >= _limit(limits, name)}
            if too_many:
                raise GraphcacheError(f"token count {too_many} reaches all of its stream's tokens: such a partial "
                                      "step cannot be exported (use a smaller fresh ratio)")
            env = dict(zip(cached.structure.input_names, args))
            env.update({name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in
                        ((CACHE_PREFIX + s, spec) for s, spec in specs.items())})
            for name, v in first_scalars(cached.schedule, key).items():
                if isinstance(v, torch.Tensor):  # exported for the device and dtype the runtime moves it to
                    env[name] = v.to(device, cached.input_dtype)
                else:
                    env[name] = step_tensor(name, v, device, scalars)
            env.update({name: torch.empty(max(2, min(hi, _limit(limits, name) - 1)), device=device)
                        for name, (_, hi) in ranges.items()})
            prologue = epilogue = None
            if sig.prologue is not None:
                prologue = _export(sig.prologue, sig.prologue_inputs, env, limits, unbatched)
                env.update(zip(sig.prologue_outputs, sig.prologue(*(env[k] for k in sig.prologue_inputs))))
            program = _export(main, sig.inputs, env, limits, unbatched)
            if sig.epilogue is not None:
                env.update(zip(sig.outputs, main(*(env[k] for k in sig.inputs))))
                epilogue = _export(sig.epilogue, sig.epilogue_inputs, env, limits, unbatched)
            exported.append(ExportedVariant(index, sig, program, prologue, epilogue, ranges))
    finally:
        torch.set_rng_state(rng)
    return exported


def variant_files(index: int, suffix: str) -> dict[str, str]:
    return {"main": f"v{index}{suffix}", "prologue": f"v{index}_prologue.pt2", "epilogue": f"v{index}_epilogue.pt2"}


def build_files(cached, backend: str, directory: Path):
    """Export every variant of `cached` into `directory` with `backend`'s builder: the variants,
    and their shared weights ({name: tensor}, written to WEIGHTS_FILE first)."""
    module = backend_module(backend)
    module.check(cached)
    directory.mkdir(parents=True, exist_ok=True)
    variants = export_variants(cached)
    weights = shared_weights(variants)
    _save_weights(weights, directory / WEIGHTS_FILE)
    for v in variants:
        files = variant_files(v.index, module.SUFFIX)
        with quiet_torch():
            module.build(v, directory / files["main"], directory / WEIGHTS_FILE)
            for part in ("prologue", "epilogue"):
                if getattr(v, part) is not None:
                    torch.export.save(getattr(v, part), directory / files[part])
    return variants, weights


def shared_weights(variants: list[ExportedVariant]) -> dict[str, torch.Tensor]:
    """{name: tensor} of every parameter, buffer and lifted tensor the variants' main programs
    use, each once (the variants of one model share them: the same tensors, used in place)."""
    weights: dict[str, torch.Tensor] = {}
    for v in variants:
        for name, t in {**v.main.state_dict, **v.main.constants}.items():
            if not isinstance(t, torch.Tensor):
                continue
            t = t.detach()
            seen = weights.setdefault(name, t)
            if seen is not t and not (seen.shape == t.shape and seen.dtype == t.dtype and torch.equal(seen, t)):
                raise GraphcacheError(f"two variants hold different values for the constant {name}: "
                                      "their weights cannot be shared")
    return weights


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory: a name whose storage was already written
    (a tied or viewed weight) is saved as a copy."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, t in weights.items():
        t = t.contiguous()
        storage = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if storage in seen or t.numel() == 0 else t
        seen.add(storage)
    save_file(tensors, str(path))


class AheadOfTimeBackend:
    """Export every variant with one of the ahead-of-time formats (`aoti`, `onnx`, `tensorrt`) into
    a temporary directory that lives as long as the model (an artifact copies the files), and run
    the files."""

    hoists_conditioning = False  # each variant is exported alone, so it keeps its conditioning

    def __init__(self, name: str):
        self.name = name
        self.module = backend_module(name)

    def build(self, cached) -> Runners:
        files = tempfile.TemporaryDirectory(prefix="graphcache-")
        directory = Path(files.name)
        variants, weights = build_files(cached, self.name, directory)
        device = next(cached.model.parameters()).device
        keys = cached.schedule.variants()
        runners = {
            keys[v.index]: FunctionalRunner(
                v.sig, self.module.Runner(directory / variant_files(v.index, self.module.SUFFIX)["main"], v.sig,
                                          device, weights),
                cached.cache, cached.structure.input_names)
            for v in variants
        }
        return Runners(runners, exported=variants, files=files, weights=weights)


__all__ = ["AHEAD_OF_TIME", "WEIGHTS_FILE", "AheadOfTimeBackend", "ExportedVariant", "backend_module", "build_files",
           "export_variants", "quiet_torch", "shared_weights", "token_ranges", "variant_files"]
