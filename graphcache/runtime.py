"""CachedModel: the captured model's variants, the cache they share, and the step counter.

Each distinct step kind of the schedule gets one variant: a GraphModule over the same root module
(weights are never copied), rewritten by the method's passes. At step i the runtime looks up the
plan — host-side, from the index alone — and calls that variant with the original inputs plus the
plan's per-step inputs (token counts, forecast distances) and, on the eager and compile backends,
the values its conditioning graph computed from (t, y) (passes/hoist_conditioning.py): for every
step at once when `graphcache.sample` announced the run's inputs, else step by step.

`backend` picks what runs a variant (graphcache/exporters/base.py): "eager" calls a copy of the
GraphModule rewritten for eager speed (exporters/eager.py); "compile" calls its `torch.compile`d
forward (exporters/compile.py); "aoti", "onnx" and "tensorrt" run files exported from its
functional form (exporters/export.py). The backend returns the runners; the model keeps them.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn

from . import ir
from .cache import CACHE_ATTR, CacheState, declared_slots
from .capture import call_arguments, capture_call, example_inputs, propagate_shapes
from .errors import GraphcacheError
from .exporters import get_backend
from .methods import get_method
from .passes.contiguous_stream import MakeStreamContiguousPass
from .passes.hoist_conditioning import CONDITIONING_KEY, HoistConditioningPass, conditioning_inputs
from .passes.manager import PassManager, PassPipelineError, PassRecord
from .passes.prune_modulation import PruneModulationPass
from .schedule import StepPlan, run_lengths, step_inputs
from .stepping import MODEL_ATTRS, SteppedModel

# Most memory one window of precomputed conditioning may take: DiT-XL/2's modulation is ~0.8 MB per
# batch row and step, so a 50-step run at batch 2 is one window, while a large batch over 250
# steps is split into windows (each still reads the adaLN weights once for all its steps)
TABLE_BUDGET_BYTES = 256 * 2**20


def new_variant(captured: fx.GraphModule, cache: CacheState) -> fx.GraphModule:
    """A fresh copy of the captured graph over the same root, with `cache` attached, ready for passes."""
    graph = fx.Graph()
    out = graph.graph_copy(captured.graph, {})
    graph.output(out)
    gm = fx.GraphModule(captured, graph, class_name=captured.__class__.__name__)
    gm.meta[ir.META_KEY] = ir.structure_of(captured)
    setattr(gm, CACHE_ATTR, cache)
    return gm


def extra_inputs(gm: fx.GraphModule, inputs: dict) -> dict:
    """The subset of a plan's per-step inputs that this variant has placeholders for."""
    names = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    return {k: v for k, v in inputs.items() if k in names}


class DelegatesToModel:
    """A module mixin: attribute lookups the module cannot answer go to its child `_delegate` (the
    wrapped model), so that code written for the model (`model.config`, `.dtype`) works on it."""

    _delegate = "model"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get(self._delegate)
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


class CachedModel(DelegatesToModel, SteppedModel):
    """A drop-in nn.Module for the wrapped model: called as the model is (positional or keyword
    arguments), it returns what the model returns (a tensor, a tuple, diffusers' output dataclass),
    and attributes it does not have itself (`config`, `dtype`, `device`, hooks) are the model's.

    The model is captured on the example inputs given, on `example_inputs(model)` for the
    built-in DiT, or else on its first call. A call the capture cannot serve — other arguments,
    another flag, another resolution or prompt length (any input shape past the batch) — captures
    it again and restarts the schedule; another batch size only re-allocates the cache."""

    def __init__(self, model: nn.Module, method: str = "fora", num_steps: int = 50, inputs=None,
                 dump_dir=None, dump=(), backend: str = "eager", compile_options: dict | None = None,
                 hoist_conditioning: bool = True, kwargs: dict | None = None, **options):
        super().__init__()
        self.runs = get_backend(backend, compile_options)
        self.model = model.eval()
        self.method = get_method(method)
        self.method.resolve_options(options)  # unknown or invalid options fail now, not at the first call
        self.num_steps_wanted, self.given_options = num_steps, options
        self.dump_dir, self.dump, self.backend = dump_dir, dump, backend
        self.hoist_requested = hoist_conditioning
        self.spec = None
        self.cache = CacheState()
        self.step_index = 0
        for attr in MODEL_ATTRS:
            if attr in vars(model):  # diffusers models read these from `config` (the fallback below)
                setattr(self, attr, vars(model)[attr])
        if inputs is None and kwargs is None:
            try:
                inputs = example_inputs(model)
            except GraphcacheError:
                return  # captured at the first call
        self._capture(inputs or (), kwargs)

    @property
    def num_steps(self) -> int:
        return self.num_steps_wanted

    def _capture(self, args, kwargs) -> None:
        """Capture the model on this call and build every variant and its runner."""
        captured, spec = capture_call(self.model, args, kwargs)
        self._build_on(captured, spec, spec.flatten(call_arguments(self.model, args, kwargs)))

    def share_capture(self, other: CachedModel) -> None:
        """Build this model's variants on `other`'s capture of the same model, without exporting it
        again: for CachedModels that take the same calls with caches of their own (the calls of one
        pipeline step, one per guidance branch). A call the capture cannot serve captures again."""
        if other.model is not self.model or other.spec is None:
            raise GraphcacheError("share_capture needs a CachedModel of the same model that has captured it")
        self._build_on(other.captured, other.spec, other.capture_inputs)

    def _build_on(self, captured: fx.GraphModule, spec, capture_inputs) -> None:
        """Build every variant and its runner from a capture: the graph (each variant is a copy of
        it), how calls map onto it, and the flat inputs it was captured on."""
        self.captured, self.spec = captured, spec
        # the flat inputs captured on: the ahead-of-time exporters trace with them (at their own batch)
        self.capture_inputs = capture_inputs
        self.capture_signature = self.spec.signature(self.capture_inputs)
        self.structure = ir.structure_of(self.captured)
        if self.given_options.get("eoc"):
            check_prior_model(self.given_options["eoc"], self.model)
        self.schedule = self.method.schedule(self.num_steps_wanted, self.structure.depth, self.given_options,
                                             self.structure.num_tokens, self.structure)
        self.options = self.schedule.options
        self.hoists_conditioning = self.hoist_requested and self.runs.hoists_conditioning
        self.condition_inputs = conditioning_inputs(self.captured) if self.hoists_conditioning else {}
        self.cache = CacheState()
        self.variants: dict[tuple, fx.GraphModule] = {}
        self.records: dict[tuple, list[PassRecord]] = {}
        for plan in self.schedule.steps:
            if plan.variant not in self.variants:
                self._build(plan, self.dump_dir, self.dump)
        self.conditionings = {key: gm.meta[CONDITIONING_KEY] for key, gm in self.variants.items()
                              if CONDITIONING_KEY in gm.meta}
        self.condition_table: dict[int, dict] = {}  # step -> its hoisted values, for the current window
        self.conditioning_is_rowwise: bool | None = None  # checked once, on the first window
        built = self.runs.build(self)
        self.runners = built.by_variant  # variant key -> callable replacing the GraphModule
        self.runner_records = built.records
        self.exported, self.files, self.weights = built.exported, built.files, built.weights
        self.compile_options = built.compile_options
        # Each step's extra graph inputs, resolved once: the sampling loop only indexes this list.
        self.step_kwargs = [extra_inputs(self.variants[p.variant], step_inputs(p)) for p in self.schedule.steps]
        self.step_index = 0

    def forward(self, *args, **kwargs):
        arguments = call_arguments(self.model, args, kwargs)
        flat = self.spec.flatten(arguments) if self.spec is not None else None
        if flat is None or self.spec.signature(flat) != self.capture_signature:
            if self.spec is not None and self.step_index != 0:
                warnings.warn("the call differs from the captured one (arguments, shapes past the batch, dtypes or "
                              "devices) in the middle of a sampling run: the model is captured again and the "
                              "schedule restarts at its first (full) step", stacklevel=2)
            self._capture((), arguments)
            flat = self.spec.flatten(arguments)
        return self.spec.unflatten(super().forward(*flat))

    def _build(self, plan: StepPlan, dump_dir, dump) -> None:
        gm = new_variant(self.captured, self.cache)
        label = "_".join(f"{k}{n}" for k, n in run_lengths(plan.kinds))
        # Every variant ends with the generic clean-up: modulation nobody reads is not computed, and
        # the stream is row-major from the first block on (last: method passes rely on the structure).
        hoist = [HoistConditioningPass(self.condition_inputs)] if self.hoists_conditioning else []
        manager = PassManager([*self.method.variant_passes(plan, self.options), PruneModulationPass(),
                               MakeStreamContiguousPass(), *hoist],
                              dump_dir=f"{dump_dir}/{label}" if dump_dir else None, dump=dump)
        try:
            self.records[plan.variant] = manager(gm)
        except PassPipelineError as e:
            raise GraphcacheError(f"{self.method.name}: building the variant {label} failed: {e}") from e
        self.variants[plan.variant] = gm

    def reset(self) -> None:
        super().reset()
        self.condition_table = {}
        for conditioning in getattr(self, "conditionings", {}).values():  # none before the first capture
            conditioning.forget()  # values kept from the last run's inputs: the weights may have changed since

    def announce_inputs(self, step_args) -> None:
        super().announce_inputs(step_args)
        self.condition_table = {}  # made from the inputs announced before

    def conditioning_inputs(self, index: int, args) -> dict:
        """The values this step's variant reads from the conditioning (HoistConditioningPass).

        When the step passes the announced inputs, they come from a table made for a window of
        steps (the whole run unless that exceeds TABLE_BUDGET_BYTES) at its first step: one
        evaluation per variant on all its steps' inputs stacked along the batch. Otherwise this
        step's are computed from its own inputs."""
        conditioning = self.conditionings.get(self.schedule[index].variant)
        if conditioning is None:
            return {}
        announced = self.announced[index] if self.announced is not None else None
        if (announced is not None and conditioning.stackable and self.conditioning_is_rowwise is not False
                and all(0 < p <= len(announced) and args[p] is announced[p - 1] for p in conditioning.inputs)):
            if index not in self.condition_table:
                self.condition_table = self._tabulate_conditioning(index, args)
            if index in self.condition_table:
                return self.condition_table[index]
        return conditioning.values(args)

    def _conditioning_window(self, start: int) -> list[int]:
        """The steps from `start` on whose tables fit TABLE_BUDGET_BYTES together (at least one)."""
        window, size = [], 0
        for i in range(start, self.num_steps):
            conditioning = self.conditionings.get(self.schedule[i].variant)
            if conditioning is None:
                continue
            rows = self.announced[i][conditioning.inputs[0] - 1].shape[0]
            size += conditioning.row_bytes * rows
            if window and size > TABLE_BUDGET_BYTES:
                break
            window.append(i)
        return window

    def _tabulate_conditioning(self, index: int, args) -> dict[int, dict]:
        """The hoisted values of a window of steps from `index` on, from the announced inputs ({} if
        the conditioning turned out to mix batch rows, so that stacking steps would change it)."""
        window = self._conditioning_window(index)
        table: dict[int, dict] = {i: {} for i in window}
        for key, conditioning in self.conditionings.items():
            steps = [i for i in window if self.schedule[i].variant == key]
            if not steps:
                continue
            stacked = [torch.cat([self.announced[i][p - 1] for i in steps]) for p in conditioning.inputs]
            for name, value in zip(conditioning.names, conditioning.graph(*stacked)):
                for i, per_step in zip(steps, value.unflatten(0, (len(steps), -1)).unbind(0)):
                    table[i][name] = per_step
        if self.conditioning_is_rowwise is None:
            conditioning = self.conditionings[self.schedule[index].variant]
            self.conditioning_is_rowwise = all(
                torch.allclose(table[index][name], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()))
                for name, value in conditioning.values(args).items())
            if not self.conditioning_is_rowwise:
                warnings.warn("the model's conditioning mixes batch rows: it is computed step by step",
                              stacklevel=3)
        return table if self.conditioning_is_rowwise else {}

    def slots(self) -> dict:
        slots = {}
        for gm in self.variants.values():
            slots.update(declared_slots(gm))
        return slots

    def slot_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every slot for the shapes last propagated through the captured graph
        (the capture's example inputs until the first call)."""
        nodes = ir.nodes_by_name(self.captured.graph)
        return {name: s.resolve(nodes[s.like].meta["tensor_meta"]) for name, s in self.slots().items()}

    def _allocate(self, args, signature) -> None:
        """Allocate every slot for these input shapes (shapes come from fake-tensor propagation)."""
        if self.slots():
            propagate_shapes(self.captured, args)
        device = next(self.model.parameters()).device
        self.cache.allocate(self.slot_specs(), device, signature)
        # per-step tensor inputs (EOC's factors) live where the model runs, in its dtype; one copy
        # of a tensor many steps share (the ones of uncorrected branches)
        moved: dict[int, torch.Tensor] = {}

        def move(v):
            if not isinstance(v, torch.Tensor):
                return v
            if id(v) not in moved:
                moved[id(v)] = v.to(device, self.input_dtype)
            return moved[id(v)]

        self.step_kwargs = [{k: move(v) for k, v in kwargs.items()} for kwargs in self.step_kwargs]

    @property
    def unbatched_inputs(self) -> set[str]:
        """The model's tensor inputs whose dim 0 is not the batch (FLUX's token positions)."""
        return {name for name, batched in zip(self.structure.input_names, self.spec.symbolic_batch) if not batched}

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the latents the model takes."""
        return next(self.model.parameters()).dtype

    def runner(self, index: int):
        plan = self.schedule[index]
        return self.runners.get(plan.variant, self.variants[plan.variant])

    def describe(self) -> dict:
        """What capture found and, per variant, what each pass did (for `graphcache inspect`):
        the method's passes on the variant, and the backend's on its runner (eager)."""
        variants = []
        for key in self.schedule.variants():
            plan = self.schedule.steps_of(key)[0]
            variants.append({
                "kinds": ", ".join(f"{k}×{n}" for k, n in run_lengths(plan.kinds)),
                "steps": [p.index for p in self.schedule.steps_of(key)],
                "nodes": len(self.variants[key].graph.nodes),
                "passes": _records_json(self.records[key]),
                "runner_passes": _records_json(self.runner_records.get(key, [])),
            })
        return {
            "method": self.method.name,
            "options": self.options,
            "num_steps": self.num_steps,
            "backend": self.backend,
            "captured_nodes": len(self.captured.graph.nodes),
            "streams": [{"name": st.name, "start": st.start, "end": st.end, "tokens": st.num_tokens}
                        for st in self.structure.streams],
            "unclassified": list(self.structure.unclassified),
            "blocks": self.structure.describe(),
            "variants": variants,
        }


def check_prior_model(path, model: nn.Module) -> None:
    """GraphcacheError unless the EOC prior at `path` was calibrated on this model's weights."""
    from .eoc import fingerprint, load_prior

    expected, found = load_prior(path).meta["fingerprint"], fingerprint(model)
    if found != expected:
        raise GraphcacheError(f"{path} was calibrated on another model (fingerprint {expected}, this model "
                              f"{found}): run `graphcache calibrate` on this model")


def check_prior_sampler(path, sampler: str) -> None:
    """GraphcacheError unless the EOC prior at `path` was calibrated with this sampler (a pipeline's
    scheduler class, or graphcache's sampler name): the trends follow the sampler's trajectory."""
    from .eoc import load_prior

    expected = load_prior(path).meta["sampler"]
    if sampler != expected:
        raise GraphcacheError(f"{path} was calibrated with the {expected} sampler, not {sampler}: run "
                              "`graphcache calibrate` with this one")


def _records_json(records: list[PassRecord]) -> list[dict]:
    return [{"pass": r.name, "counters": r.counters, "declined": [f"{d.target}: {d.reason}" for d in r.declined]}
            for r in records]


def optimize(model: nn.Module, method: str = "fora", num_steps: int = 50, inputs=None, *, backend: str = "eager",
             compile_options: dict | None = None, hoist_conditioning: bool = True, kwargs: dict | None = None,
             **options) -> CachedModel:
    """Compile `method` into `model` for a `num_steps` sampling run. Options are the method's own.

    Returns a drop-in replacement for `model` (CachedModel): the same call signature and return
    type. `inputs` (positional) and `kwargs` are example arguments to capture it on; without them
    the built-in DiT is captured on its example inputs and any other model on its first call.

    backend: "eager" runs the variants as GraphModules; "compile" runs each under
    `torch.compile(fullgraph=True)`, configured by `compile_options` (keys backend, mode,
    dynamic, options; see graphcache/exporters/compile.py).
    hoist_conditioning (eager and compile): compute what depends only on (t, y) — the adaLN
    modulation — for every step at once at the first step of a `graphcache.sample` run
    (passes/hoist_conditioning.py). Values then differ from step-by-step ones by float rounding
    (a batched GEMM sums in another order); False keeps the plain model's arithmetic exactly."""
    return CachedModel(model, method=method, num_steps=num_steps, inputs=inputs, backend=backend,
                       compile_options=compile_options, hoist_conditioning=hoist_conditioning, kwargs=kwargs,
                       **options)
