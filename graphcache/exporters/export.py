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

Weights are stored once for all variants: `shared_weights` collects every constant of every
variant's program, by name, once, and `build_files` writes them as `WEIGHTS_FILE` before
building the files. AOTInductor packages leave them out and take the tensors at load time
(`WEIGHTS_IN_MEMORY`: in-process the model's own parameters, from an artifact the loaded file);
ONNX files reference the file as external data.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config  # noqa: F401 (backed_size_oblivious)
from torch.export import Dim

from ..capture import example_inputs, propagate_shapes
from ..errors import GraphcacheError
from ..passes.functionalize import CACHE_PREFIX, Signature, functionalize
from ..schedule import is_token_input, step_inputs
from ..runtime import MODEL_ATTRS, SteppedModel
from .functional import FunctionalRunner, ScalarTensors, step_tensor

AHEAD_OF_TIME = ("aoti", "onnx", "tensorrt")
WEIGHTS_FILE = "weights.safetensors"  # shared by the variants
EXAMPLE_BATCH = 4
# Smallest batch an artifact accepts: one image with guidance. Size-oblivious export reports
# ranges from 0, but the graphs branch on batch parity (ToCa's shared CFG draw) and were traced
# with an even batch, so an odd batch of 1 is refused rather than trusted.
MIN_BATCH = 2


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


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's own FutureWarnings about pytree specs, printed while it exports, pickles
    and packages programs (nothing a user of graphcache can act on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _export(gm, names, env, num_tokens) -> torch.export.ExportedProgram:
    values = tuple(env[n] for n in names)
    try:
        # size-oblivious: a batch of 2 rows gives rand(batch // 2 = 1, N) in ToCa's random score,
        # which must not become a guard "batch // 2 != 1"
        with quiet_torch(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
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
                prologue = _export(sig.prologue, sig.prologue_inputs, env, n)
                env.update(zip(sig.prologue_outputs, sig.prologue(*(env[k] for k in sig.prologue_inputs))))
            program = _export(main, sig.inputs, env, n)
            if sig.epilogue is not None:
                env.update(zip(sig.outputs, main(*(env[k] for k in sig.inputs))))
                epilogue = _export(sig.epilogue, sig.epilogue_inputs, env, n)
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


def install_runners(cached, backend: str, directory: Path) -> None:
    """Build the files and make `cached` run them: one FunctionalRunner per variant key."""
    module = backend_module(backend)
    variants, cached.weights = build_files(cached, backend, directory)
    device = next(cached.model.parameters()).device
    keys = cached.schedule.variants()
    cached.exported = variants
    cached.runners = {
        keys[v.index]: FunctionalRunner(v.sig, module.Runner(directory / variant_files(v.index, module.SUFFIX)["main"],
                                                             v.sig, device, cached.weights),
                                        cached.cache, cached.structure.input_names)
        for v in variants
    }


# --------------------------------------------------------------------------------------------
# Artifacts: the exported files, and a model that runs them without the model's Python code
# --------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise GraphcacheError(f"unknown dtype {name!r} in the artifact manifest")
    return dtype


def _batch_range(program: torch.export.ExportedProgram) -> list[int | None]:
    """[min, max] batch the program accepts: the intersection of dim 0's range over its
    batch-major inputs (every tensor input but the token counts) and [MIN_BATCH, ∞); max None
    when unbounded."""
    from torch.utils._sympy.numbers import int_oo

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    low, high = MIN_BATCH, None
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in users or is_token_input(node.name):
            continue
        shape = node.meta["val"].shape
        if not shape:
            continue
        if isinstance(shape[0], int):
            lo = hi = shape[0]
        else:
            r = program.range_constraints[shape[0].node.expr]
            lo, hi = int(r.lower), None if r.upper == int_oo else int(r.upper)
        low = max(low, lo)
        high = hi if high is None else (high if hi is None else min(high, hi))
    return [low, high]


def manifest_entries(cached, backend: str) -> dict:
    """What an artifact of `cached` (built with an ahead-of-time backend) records for its loader."""
    module = backend_module(backend)
    keys = cached.schedule.variants()
    param = next(cached.model.parameters())
    ranges = [_batch_range(v.main) for v in cached.exported]  # the artifact runs the batches all accept
    highs = [high for _, high in ranges if high is not None]
    batch = [max(low for low, _ in ranges), min(highs) if highs else None]
    variants = []
    for v in cached.exported:
        files = variant_files(v.index, module.SUFFIX)
        variants.append({
            "files": {k: f for k, f in files.items() if k == "main" or getattr(v, k) is not None},
            "signature": v.sig.names(),
            "token_ranges": v.token_ranges,
        })
    args = example_inputs(cached.model, batch=1)
    return {
        "device": param.device.type,
        "inputs": {name: {"shape": list(a.shape[1:]), "dtype": _dtype_name(a.dtype)}
                   for name, a in zip(cached.structure.input_names, args)},
        "batch": batch,
        "slots": {name: {"shape": list(shape[1:]), "dtype": _dtype_name(dtype)}
                  for name, (shape, dtype) in cached.slot_specs().items()},
        "attributes": {a: getattr(cached.model, a) for a in MODEL_ATTRS if hasattr(cached.model, a)},
        "variants": variants,
        "steps": [{"variant": keys.index(p.variant), "inputs": kwargs}
                  for p, kwargs in zip(cached.schedule.steps, cached.step_kwargs)],
        "weights": WEIGHTS_FILE,
        "backend_versions": module.versions(),
    }


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


def copy_files(cached, backend: str, dest: Path) -> None:
    import shutil

    module = backend_module(backend)
    for v in cached.exported:
        for name in variant_files(v.index, module.SUFFIX).values():
            src = Path(cached.files.name) / name
            if src.exists():
                shutil.copy2(src, dest / name)
            for extra in Path(cached.files.name).glob(name + ".*"):  # a TensorRT engine beside its ONNX file
                shutil.copy2(extra, dest / extra.name)
    shutil.copy2(Path(cached.files.name) / WEIGHTS_FILE, dest / WEIGHTS_FILE)


def _release(version: str) -> str:
    return version.split("+")[0]


def check_compatible(manifest: dict, path, device) -> None:
    """Refuse, with the reason, an artifact this process cannot run as built."""
    backend = manifest["backend"]
    built = manifest.get("versions", {}).get("torch", "?")
    if _release(built) != _release(torch.__version__):
        raise GraphcacheError(
            f"{path}: built with torch {built}, this is torch {torch.__version__}: {backend} artifacts run only "
            "on the torch release that built them (re-create it with `graphcache optimize`)")
    made_for = manifest.get("device", "cpu")
    if device.type != made_for:
        raise GraphcacheError(f"{path}: built for {made_for}, asked to run on {device.type} "
                              f"(re-create it on {device.type} with `graphcache optimize`)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraphcacheError(f"{path}: built for cuda, and this machine has no usable GPU")


class ExportedModel(SteppedModel):
    """An artifact of an ahead-of-time backend, loaded: runs the exported files step by step."""

    def __init__(self, path: Path, manifest: dict, device=None):
        super().__init__()
        from ..cache import CacheState
        from ..methods import get_method

        device = torch.device(device or manifest.get("device", "cpu"))
        check_compatible(manifest, path, device)
        module = backend_module(manifest["backend"])
        self.path, self.manifest, self.device = Path(path), manifest, device
        self.backend = manifest["backend"]
        self.method = get_method(manifest["method"])
        self.options = manifest["options"]
        self.schedule = schedule_from_json(manifest["schedule"])
        for name, value in manifest["attributes"].items():
            setattr(self, name, value)
        self.inputs = manifest["inputs"]
        self.arg_names = list(self.inputs)
        self.cache = CacheState()
        self.weights = None  # the runners use these tensors in place: they live as long as this model
        if manifest.get("weights"):
            weights = self.path / manifest["weights"]
            if not weights.is_file():
                raise GraphcacheError(f"{path}: the artifact has no {weights.name} (incomplete or damaged)")
            if module.WEIGHTS_IN_MEMORY:  # otherwise the variants' files reference the file themselves
                from safetensors.torch import load_file

                try:
                    self.weights = load_file(str(weights), device=str(device))
                except Exception as e:
                    raise GraphcacheError(f"{path}: cannot read {weights.name}: {e}") from e
        self.runners_by_variant = []
        for v in manifest["variants"]:
            sig = Signature.from_names(v["signature"])
            files = {k: self.path / f for k, f in v["files"].items()}
            for f in files.values():
                if not f.is_file():
                    raise GraphcacheError(f"{path}: the artifact has no {f.name} (incomplete or damaged)")
            main = module.Runner(files["main"], sig, device, self.weights)
            with quiet_torch():
                parts = {k: torch.export.load(files[k]).module() for k in ("prologue", "epilogue") if k in files}
            self.runners_by_variant.append(FunctionalRunner(sig, main, self.cache, self.arg_names, **parts))
        self.step_variants = [s["variant"] for s in manifest["steps"]]
        self.step_kwargs = [s["inputs"] for s in manifest["steps"]]
        self.step_index = 0

    @property
    def input_dtype(self) -> torch.dtype:
        return _dtype(self.inputs[self.arg_names[0]]["dtype"])

    def runner(self, index: int):
        return self.runners_by_variant[self.step_variants[index]]

    def _allocate(self, args, signature) -> None:
        if len(args) != len(self.arg_names):
            raise GraphcacheError(f"expected {len(self.arg_names)} inputs ({', '.join(self.arg_names)}), got {len(args)}")
        batch = args[0].shape[0]
        low, high = self.manifest["batch"]
        for name, a in zip(self.arg_names, args):
            want = self.inputs[name]
            if list(a.shape[1:]) != want["shape"] or a.shape[0] != batch or _dtype_name(a.dtype) != want["dtype"]:
                raise GraphcacheError(
                    f"{self.path}: input {name} is {tuple(a.shape)} {_dtype_name(a.dtype)}; the artifact was built "
                    f"for (batch, {', '.join(map(str, want['shape']))}) {want['dtype']}")
            if a.device.type != self.device.type:
                raise GraphcacheError(f"{self.path}: input {name} is on {a.device}, the artifact runs on {self.device}")
        if batch < low or (high is not None and batch > high):
            raise GraphcacheError(f"{self.path}: batch {batch} is outside the artifact's batch range "
                                  f"[{low}, {high if high is not None else '∞'}] (with guidance the batch is 2 × images)")
        specs = {name: ((batch, *s["shape"]), _dtype(s["dtype"])) for name, s in self.manifest["slots"].items()}
        self.cache.allocate(specs, self.device, signature)


def schedule_from_json(data: dict):
    from ..schedule import Schedule, StepPlan

    steps = [StepPlan(s["index"], s["step"], tuple(s["kinds"]),
                      tuple(s["tokens"]) if s.get("tokens") is not None else None) for s in data["steps"]]
    return Schedule(data["method"], data["options"], data["num_steps"], data["depth"], steps)


__all__ = ["AHEAD_OF_TIME", "WEIGHTS_FILE", "ExportedModel", "ExportedVariant", "backend_module", "build_files",
           "check_compatible", "copy_files", "export_variants", "install_runners", "manifest_entries",
           "schedule_from_json", "shared_weights", "token_ranges", "variant_files"]
