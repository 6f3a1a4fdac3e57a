"""Artifacts of the ahead-of-time backends: what their manifest records, the files they copy, and
`ExportedModel`, which runs the exported files without the model's Python code (graphcache/artifact.py
saves and loads the directory; graphcache/exporters/export.py builds the files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from .cache import CacheState
from .errors import GraphcacheError
from .exporters.export import WEIGHTS_FILE, backend_module, quiet_torch, variant_files
from .exporters.functional import FunctionalRunner
from .methods import get_method
from .passes.functionalize import Signature
from .schedule import Schedule, StepPlan, is_correction_input, is_token_input
from .stepping import SteppedModel, model_attributes

# Per-step tensor inputs (EOC's correction factors), each stored once however many steps share it;
# the manifest's step inputs name them as {"tensor": key}. The artifact needs no prior file to run.
STEP_TENSORS = "step_inputs.safetensors"

# Smallest batch an artifact whose variants draw random numbers accepts: one image with guidance.
# Size-oblivious export reports ranges from 0, but those draws branch on batch parity (ToCa's
# shared CFG draw) and were traced with an even batch, so an odd batch of 1 is refused rather
# than trusted. Variants without draws take one image (FLUX's guidance-distilled batch of 1).
MIN_BATCH = 2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise GraphcacheError(f"unknown dtype {name!r} in the artifact manifest")
    return dtype


def _batch_range(program: torch.export.ExportedProgram, unbatched: set[str], least: int) -> list[int | None]:
    """[min, max] batch the program accepts: the intersection of dim 0's range over its
    batch-major inputs (every tensor input but the token counts, EOC's factors and the model
    inputs in `unbatched`) and [least, ∞); max None when unbounded."""
    from torch.utils._sympy.numbers import int_oo

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    low, high = least, None
    for node in program.graph.nodes:
        if (node.op != "placeholder" or node.name not in users or is_token_input(node.name)
                or is_correction_input(node.name) or node.name in unbatched):
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


def _input_entry(value: torch.Tensor, batched: bool) -> dict:
    """An input's shape past the batch, or its whole shape marked `"batched": false` when its dim 0
    is not the batch (FLUX's token positions)."""
    if batched:
        return {"shape": list(value.shape[1:]), "dtype": _dtype_name(value.dtype)}
    return {"shape": list(value.shape), "dtype": _dtype_name(value.dtype), "batched": False}


def manifest_entries(cached, backend: str) -> dict:
    """What an artifact of `cached` (built with an ahead-of-time backend) records for its loader."""
    module = backend_module(backend)
    keys = cached.schedule.variants()
    param = next(cached.model.parameters())
    step_inputs, tensors = recorded_step_inputs(cached)
    least = MIN_BATCH if any(v.prologue is not None for v in cached.exported) else 1
    # the artifact runs the batches all variants accept
    ranges = [_batch_range(v.main, cached.unbatched_inputs, least) for v in cached.exported]
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
    return {
        "device": param.device.type,
        "inputs": {name: _input_entry(a, batched) for name, a, batched in
                   zip(cached.structure.input_names, cached.capture_inputs, cached.spec.symbolic_batch)},
        "batch": batch,
        "slots": {name: {"shape": list(shape[1:]), "dtype": _dtype_name(dtype)}
                  for name, (shape, dtype) in cached.slot_specs().items()},
        "attributes": model_attributes(cached.model),
        "variants": variants,
        "steps": [{"variant": keys.index(p.variant), "inputs": inputs}
                  for p, inputs in zip(cached.schedule.steps, step_inputs)],
        **({"step_tensors": STEP_TENSORS} if tensors else {}),
        "weights": WEIGHTS_FILE,
        "backend_versions": module.versions(),
    }


def recorded_step_inputs(cached) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Each step's inputs as the manifest records them, a tensor as {"tensor": key}, and the
    tensors by key (on the cpu, in the model's input dtype, as the variants were exported)."""
    keys: dict[int, str] = {}  # one key per tensor object: the steps that share a factor share its key
    tensors, steps = {}, []
    for index, kwargs in enumerate(cached.step_kwargs):
        inputs = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                key = keys.setdefault(id(value), f"{name}@{index}")
                tensors[key] = value.detach().to("cpu", cached.input_dtype).contiguous()
                value = {"tensor": key}
            inputs[name] = value
        steps.append(inputs)
    return steps, tensors


def copy_files(cached, backend: str, dest: Path) -> None:
    from safetensors.torch import save_file

    module = backend_module(backend)
    tensors = recorded_step_inputs(cached)[1]
    if tensors:
        save_file(tensors, str(dest / STEP_TENSORS))
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
    """An artifact of an ahead-of-time backend, loaded: runs the exported files step by step.

    Called as the model was, without its Python code: the tensor inputs recorded in the manifest
    (`inputs`, in the forward's order: x, t, y for graphcache's DiT; hidden_states,
    encoder_hidden_states, timestep for PixArt-α) positionally or by name. Any other keyword
    argument must hold no value (None, or diffusers' `added_cond_kwargs={"resolution": None, ...}`):
    what the model was captured with is built into the files. It returns the prediction tensor,
    or with `return_dict=False` a 1-tuple, as diffusers' models do; their output dataclass
    (`return_dict=True`) would need diffusers, so the tensor comes bare."""

    def __init__(self, path: Path, manifest: dict, device=None):
        super().__init__()
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
                    # copied into fresh (64-byte aligned) memory: the file's tensors start wherever its
                    # header ends, and CPU GEMMs round differently on misaligned operands (the artifact
                    # would not compute exactly what the model it was exported from does)
                    self.weights = {name: t.clone() for name, t in load_file(str(weights), device=str(device)).items()}
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
        tensors = self._step_tensors(device)
        self.step_kwargs = [{name: tensors[v["tensor"]] if isinstance(v, dict) else v for name, v in s["inputs"].items()}
                            for s in manifest["steps"]]
        self.step_index = 0

    def _step_tensors(self, device) -> dict[str, torch.Tensor]:
        """The per-step tensor inputs the manifest names (STEP_TENSORS), on `device`."""
        name = self.manifest.get("step_tensors")
        if not name:
            return {}
        from safetensors.torch import load_file

        path = self.path / name
        if not path.is_file():
            raise GraphcacheError(f"{self.path}: the artifact has no {name} (incomplete or damaged)")
        tensors = load_file(str(path), device=str(device))
        missing = sorted({v["tensor"] for s in self.manifest["steps"] for v in s["inputs"].values()
                          if isinstance(v, dict)} - set(tensors))
        if missing:
            raise GraphcacheError(f"{self.path}: {name} has no tensor {missing[0]} (incomplete or damaged)")
        return tensors

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if len(args) > len(self.arg_names):
            raise GraphcacheError(f"{self.path}: expected at most {len(self.arg_names)} positional inputs "
                                  f"({', '.join(self.arg_names)}), got {len(args)}")
        named = dict(zip(self.arg_names, args))
        for name, value in kwargs.items():
            if name in named:
                raise GraphcacheError(f"{self.path}: input {name} given twice")
            if name in self.arg_names:
                named[name] = value
            elif any(leaf is not None for leaf in pytree.tree_leaves(value)):
                raise GraphcacheError(f"{self.path}: the artifact has no input {name} "
                                      f"(its inputs: {', '.join(self.arg_names)})")
        missing = [n for n in self.arg_names if n not in named]
        if missing:
            raise GraphcacheError(f"{self.path}: missing input {', '.join(missing)} "
                                  f"(the artifact's inputs: {', '.join(self.arg_names)})")
        out = super().forward(*(named[n] for n in self.arg_names))
        return out if return_dict else (out,)

    @property
    def input_dtype(self) -> torch.dtype:
        return _dtype(self.inputs[self.arg_names[0]]["dtype"])

    def runner(self, index: int):
        return self.runners_by_variant[self.step_variants[index]]

    def _allocate(self, args, signature) -> None:
        batch = args[0].shape[0]
        low, high = self.manifest["batch"]
        for name, a in zip(self.arg_names, args):
            want = self.inputs[name]
            batched = want.get("batched", True)
            shape = [batch, *want["shape"]] if batched else want["shape"]
            if list(a.shape) != shape or _dtype_name(a.dtype) != want["dtype"]:
                built = ["batch", *want["shape"]] if batched else want["shape"]
                raise GraphcacheError(
                    f"{self.path}: input {name} is {tuple(a.shape)} {_dtype_name(a.dtype)}; the artifact was built "
                    f"for ({', '.join(map(str, built))}) {want['dtype']} (another resolution or prompt length needs "
                    "its own artifact)")
            if a.device.type != self.device.type:
                raise GraphcacheError(f"{self.path}: input {name} is on {a.device}, the artifact runs on {self.device}")
        if batch < low or (high is not None and batch > high):
            raise GraphcacheError(f"{self.path}: batch {batch} is outside the artifact's batch range "
                                  f"[{low}, {high if high is not None else '∞'}] (with guidance the batch is 2 × images)")
        specs = {name: ((batch, *s["shape"]), _dtype(s["dtype"])) for name, s in self.manifest["slots"].items()}
        self.cache.allocate(specs, self.device, signature)


def schedule_from_json(data: dict):
    steps = [StepPlan(s["index"], s["step"], tuple(s["kinds"]),
                      tuple(s["tokens"]) if s.get("tokens") is not None else None) for s in data["steps"]]
    return Schedule(data["method"], data["options"], data["num_steps"], data["depth"], steps)
