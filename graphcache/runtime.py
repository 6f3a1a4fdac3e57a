"""CachedModel: the captured model's variants, the cache they share, and the step counter.

Each distinct step kind of the schedule gets one variant: a GraphModule over the same root module
(weights are never copied), rewritten by the method's passes. At step i the runtime looks up the
plan — host-side, from the index alone — and calls that variant with the original inputs plus the
plan's per-step inputs (token counts, forecast distances) and, on the eager and compile backends,
the values its conditioning graph computed from (t, y) (passes/hoist_conditioning.py): for every
step at once when `graphcache.sample` announced the run's inputs, else step by step.

`backend` picks what runs a variant: "eager" calls a copy of the GraphModule with each cache op
replaced by its kernel (`eager_runner`); "compile" calls its `torch.compile`d forward
(graphcache/exporters/compile.py); "aoti", "onnx" and "tensorrt" run files exported from its
functional form (graphcache/exporters/export.py). Each installs `runners`.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
from torch import nn

from . import ir
from .cache import CACHE_ATTR, CacheState, declared_slots
from .capture import capture, propagate_shapes
from .errors import GraphcacheError
from .methods import get_method
from .ops import EAGER_KERNELS
from .passes.contiguous_stream import MakeStreamContiguousPass
from .passes.few_token_linears import TransposeFewTokenLinearsPass
from .passes.hoist_conditioning import CONDITIONING_KEY, HoistConditioningPass, conditioning_inputs
from .passes.manager import PassManager, PassPipelineError, PassRecord
from .passes.prune_modulation import PruneModulationPass
from .passes.reuse_temporaries import ReuseDeadTemporariesPass
from .passes.taylor import UpdateTaylorFactorsInPlacePass
from .schedule import StepPlan, step_inputs

# Most memory one window of precomputed conditioning may take: DiT-XL/2's modulation is ~0.8 MB per
# batch row and step, so a 50-step run at batch 2 is one window, while a large batch over 250
# steps is split into windows (each still reads the adaLN weights once for all its steps)
TABLE_BUDGET_BYTES = 256 * 2**20

MODEL_ATTRS = ("in_channels", "input_size", "learn_sigma", "num_classes", "out_channels", "patch_size")


def new_variant(captured: fx.GraphModule, cache: CacheState) -> fx.GraphModule:
    """A fresh copy of the captured graph over the same root, with `cache` attached, ready for passes."""
    graph = fx.Graph()
    out = graph.graph_copy(captured.graph, {})
    graph.output(out)
    gm = fx.GraphModule(captured, graph, class_name=captured.__class__.__name__)
    gm.meta[ir.META_KEY] = ir.structure_of(captured)
    setattr(gm, CACHE_ATTR, cache)
    return gm


def with_cache_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` over `gm` itself, each cache op replaced by its kernel (`ops.EAGER_KERNELS`)."""
    graph = copy.deepcopy(gm.graph)  # new nodes (their meta shared, not copied) and the same codegen
    for node in graph.nodes:
        if node.op == "call_function" and node.target in EAGER_KERNELS:
            node.target = EAGER_KERNELS[node.target]
    return fx.GraphModule(gm, graph)


def eager_runner(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` for eager runs: the same graph over the same modules, with each cache op replaced by
    its kernel (`ops.EAGER_KERNELS`), elementwise ops computed into their dead operands
    (`ReuseDeadTemporariesPass`), Taylor factors refreshed in place (`UpdateTaylorFactorsInPlacePass`)
    and the selected tokens' linears as W·xᵀ (`TransposeFewTokenLinearsPass`). Safe because no
    dead-code elimination runs on this copy: none will drop a kernel call whose result nobody reads."""
    runner = with_cache_kernels(gm)
    UpdateTaylorFactorsInPlacePass()(runner)
    ReuseDeadTemporariesPass()(runner)
    TransposeFewTokenLinearsPass()(runner)
    # GraphModule copies only what the graph names, under new parent modules; share the variant's
    # own children instead, so slots the cache (re-)allocates later are the ones the runner reads
    for name, child in gm.named_children():
        setattr(runner, name, child)
    return runner


def extra_inputs(gm: fx.GraphModule, inputs: dict) -> dict:
    """The subset of a plan's per-step inputs that this variant has placeholders for."""
    names = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    return {k: v for k, v in inputs.items() if k in names}


class SteppedModel(nn.Module):
    """The sampling-loop side shared by CachedModel and exported artifacts (exporters/export.py):
    a step counter, the cache for the current input signature, one runner per step.

    Subclasses set `schedule`, `cache`, `step_kwargs` (each step's extra inputs) and implement
    `_allocate(args, signature)` and `runner(index)`; they may override `conditioning_inputs`."""

    announced: list[tuple] | None = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def start_sampling(self, num_steps: int) -> None:
        """Called by graphcache.sample before a run: checks the step count and resets the state."""
        if num_steps != self.num_steps:
            raise GraphcacheError(
                f"this model was optimized for {self.num_steps} sampling steps, not {num_steps}: "
                f"optimize it again with num_steps={num_steps}"
            )
        self.reset()

    def reset(self) -> None:
        """Start a new sampling run: step 0 next, cache contents cleared, nothing announced."""
        self.step_index = 0
        self.announced = None
        for buf in self.cache.buffers():
            buf.zero_()

    def announce_inputs(self, step_args) -> None:
        """Called by graphcache.sample after `start_sampling`: every step's inputs after the
        latents (t, y), the very tensors the steps will pass, unchanged. A step that passes exactly
        these objects may use values precomputed from them; any other input is computed as it comes."""
        if len(step_args) != self.num_steps:
            raise GraphcacheError(f"announced {len(step_args)} steps' inputs for a {self.num_steps}-step run")
        self.announced = [tuple(a) for a in step_args]

    def conditioning_inputs(self, index: int, args) -> dict:
        """Extra graph inputs computed from the conditioning (none unless a subclass hoists it)."""
        return {}

    def forward(self, *args):
        signature = tuple((tuple(a.shape), a.dtype, a.device.type) for a in args if isinstance(a, torch.Tensor))
        if signature != self.cache.signature:
            if self.step_index != 0:
                warnings.warn(
                    "input shapes changed in the middle of a sampling run: the cache was dropped "
                    "and the schedule restarts at its first (full) step",
                    stacklevel=2,
                )
                self.step_index = 0
            self._allocate(args, signature)
        index = self.step_index
        out = self.runner(index)(*args, **self.step_kwargs[index], **self.conditioning_inputs(index, args))
        self.step_index = (index + 1) % self.num_steps
        return out


class CachedModel(SteppedModel):
    """An nn.Module with the wrapped model's forward signature that runs the cached variants."""

    def __init__(self, model: nn.Module, method: str = "fora", num_steps: int = 50, inputs=None,
                 dump_dir=None, dump=(), backend: str = "eager", compile_options: dict | None = None,
                 hoist_conditioning: bool = True, **options):
        super().__init__()
        from .exporters import BACKENDS

        if backend not in BACKENDS:
            raise GraphcacheError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if compile_options and backend != "compile":
            raise GraphcacheError(f"compile_options need backend='compile' (backend is {backend!r})")
        self.model = model.eval()
        self.method = get_method(method)
        self.captured = capture(model, inputs)
        self.structure = ir.structure_of(self.captured)
        self.schedule = self.method.schedule(num_steps, self.structure.depth, options, self.structure.num_tokens)
        self.options = self.schedule.options
        # The ahead-of-time backends export each variant alone, so they keep the conditioning in it
        self.hoists_conditioning = hoist_conditioning and backend in ("eager", "compile")
        self.condition_inputs = conditioning_inputs(self.captured) if self.hoists_conditioning else {}
        self.cache = CacheState()
        self.variants: dict[tuple, fx.GraphModule] = {}
        self.records: dict[tuple, list[PassRecord]] = {}
        for plan in self.schedule.steps:
            if plan.variant not in self.variants:
                self._build(plan, dump_dir, dump)
        self.conditionings = {key: gm.meta[CONDITIONING_KEY] for key, gm in self.variants.items()
                              if CONDITIONING_KEY in gm.meta}
        self.condition_table: dict[int, dict] = {}  # step -> its hoisted values, for the current window
        self.conditioning_is_rowwise: bool | None = None  # checked once, on the first window
        self.backend = backend
        self.compile_options: dict | None = None
        self.runners: dict[tuple, object] = {}  # variant key -> callable replacing the GraphModule
        if backend == "eager":
            self.runners = {key: eager_runner(gm) for key, gm in self.variants.items()}
        elif backend == "compile":
            from .exporters.compile import compile_variants

            compile_variants(self, compile_options)
        else:
            import tempfile
            from pathlib import Path

            from .exporters.export import install_runners

            # the exported files live as long as this object (an artifact copies them)
            self.files = tempfile.TemporaryDirectory(prefix="graphcache-")
            install_runners(self, backend, Path(self.files.name))
        # Each step's extra graph inputs, resolved once: the sampling loop only indexes this list.
        self.step_kwargs = [extra_inputs(self.variants[p.variant], step_inputs(p)) for p in self.schedule.steps]
        self.step_index = 0
        for attr in MODEL_ATTRS:
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def _build(self, plan: StepPlan, dump_dir, dump) -> None:
        gm = new_variant(self.captured, self.cache)
        label = "_".join(f"{k}{n}" for k, n in _runs(plan.kinds))
        # Every variant ends with the generic clean-up: modulation nobody reads is not computed, and
        # the stream is row-major from the first block on (last: method passes rely on the structure).
        hoist = [HoistConditioningPass(self.condition_inputs)] if self.hoists_conditioning else []
        manager = PassManager([*self.method.passes(plan, self.options), PruneModulationPass(),
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
        if (announced is not None and self.conditioning_is_rowwise is not False
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

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the latents the model takes."""
        return next(self.model.parameters()).dtype

    def runner(self, index: int):
        plan = self.schedule[index]
        return self.runners.get(plan.variant, self.variants[plan.variant])

    def describe(self) -> dict:
        """What capture found and, per variant, what each pass did (for `graphcache inspect`)."""
        variants = []
        for plan in self.schedule.steps:
            if plan.variant in [v["key"] for v in variants]:
                continue
            steps = [p.index for p in self.schedule.steps if p.variant == plan.variant]
            variants.append({
                "key": plan.variant,
                "kinds": ", ".join(f"{k}×{n}" for k, n in _runs(plan.kinds)),
                "steps": steps,
                "nodes": len(self.variants[plan.variant].graph.nodes),
                "passes": [
                    {"pass": r.name, "counters": r.counters,
                     "declined": [f"{d.target}: {d.reason}" for d in r.declined]}
                    for r in self.records[plan.variant]
                ],
            })
        for v in variants:
            del v["key"]
        return {
            "method": self.method.name,
            "options": self.options,
            "num_steps": self.num_steps,
            "captured_nodes": len(self.captured.graph.nodes),
            "blocks": self.structure.describe(),
            "variants": variants,
        }


def _runs(kinds):
    """Run-length encoding of per-block kinds: ("full", 1), ("partial", 27)."""
    out = []
    for k in kinds:
        if out and out[-1][0] == k:
            out[-1][1] += 1
        else:
            out.append([k, 1])
    return [tuple(r) for r in out]


def optimize(model: nn.Module, method: str = "fora", num_steps: int = 50, inputs=None, *, backend: str = "eager",
             compile_options: dict | None = None, hoist_conditioning: bool = True, **options) -> CachedModel:
    """Compile `method` into `model` for a `num_steps` sampling run. Options are the method's own.

    backend: "eager" runs the variants as GraphModules; "compile" runs each under
    `torch.compile(fullgraph=True)`, configured by `compile_options` (keys backend, mode,
    dynamic, options; see graphcache/exporters/compile.py).
    hoist_conditioning (eager and compile): compute what depends only on (t, y) — the adaLN
    modulation — for every step at once at the first step of a `graphcache.sample` run
    (passes/hoist_conditioning.py). Values then differ from step-by-step ones by float rounding
    (a batched GEMM sums in another order); False keeps the plain model's arithmetic exactly."""
    return CachedModel(model, method=method, num_steps=num_steps, inputs=inputs, backend=backend,
                       compile_options=compile_options, hoist_conditioning=hoist_conditioning, **options)
