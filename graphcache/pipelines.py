"""`graphcache.enable(pipe, method=...)`: a diffusers pipeline whose transformer runs cached.

The pipeline's transformer is replaced by a `PipelineTransformer`, a drop-in module that holds
CachedModels per distinct step count (built on the first call that asks for them, reused after),
and the pipeline's class by a subclass whose `__call__` starts a sampling run: it reads the call's
step count (`num_inference_steps`, or the length of explicit `timesteps` / `sigmas`) and how many
times a step calls the transformer (CALLS_PER_STEP), resets the caches and counts the
transformer's calls from 0. The step index comes from that count, never from a timestep value
(DPM-Solver's timesteps are not uniform). Classifier-free guidance in one batch is one call per
step: DiT, PixArt-α and SD3 concatenate the unconditional and conditional halves. FLUX's true CFG
calls the transformer twice per step, positive prompt then negative: each of the two calls has a
CachedModel of its own, so that a reuse step of the negative branch reads the negative branch's
features, and each steps once per denoising step.

Nothing of diffusers is imported here: a pipeline is anything with a `transformer` module, a
`scheduler` and a `__call__`. `graphcache.disable(pipe)` puts the original transformer and class
back; the pipeline's config is never touched.
"""

from __future__ import annotations

import inspect

from torch import nn

from .errors import GraphcacheError
from .exporters import get_backend
from .methods import get_method
from .runtime import (
    CachedModel,
    DelegatesToModel,
    check_prior_model,
    check_prior_sampler,
)

_CACHED_CLASSES: dict[type, type] = {}


class PipelineTransformer(DelegatesToModel, nn.Module):
    """The transformer a pipeline calls while graphcache is enabled: the k-th call of a step runs
    the current run's k-th CachedModel, and a run that calls it more often than its steps times
    its calls per step is refused."""

    _delegate = "transformer"

    def __init__(self, transformer: nn.Module, method: str, backend: str, compile_options, options: dict):
        super().__init__()
        self.transformer = transformer
        self.method, self.backend, self.compile_options, self.options = method, backend, compile_options, options
        # str(num_steps) -> one CachedModel per call of a step (their caches and step counters apart)
        self.by_steps = nn.ModuleDict()
        self.run_models: list[CachedModel] = []  # the current run's, in the order a step calls them
        self.calls = 0
        # unknown methods, options and backends fail at enable(), not at the first pipeline call
        get_method(method).resolve_options(options)
        get_backend(backend, compile_options)

    @property
    def current(self) -> CachedModel | None:
        """The CachedModel of each step's first call in the current run (its only one, unless the
        pipeline calls the transformer once per guidance branch)."""
        return self.run_models[0] if self.run_models else None

    def new_model(self, num_steps: int) -> CachedModel:
        """The CachedModel one call of each step of a `num_steps`-step run goes to."""
        return CachedModel(self.transformer, self.method, num_steps=num_steps, backend=self.backend,
                           compile_options=self.compile_options, **self.options)

    def start_run(self, num_steps: int, calls_per_step: int = 1) -> None:
        key = str(num_steps)
        if key not in self.by_steps:
            self.by_steps[key] = nn.ModuleList()
        models = self.by_steps[key]
        while len(models) < calls_per_step:
            models.append(self.new_model(num_steps))
        self.run_models = list(models[:calls_per_step])
        for model in self.run_models:
            model.reset()
        self.calls = 0

    def forward(self, *args, **kwargs):
        if not self.run_models:
            raise GraphcacheError("the cached transformer was called outside a pipeline call: call the pipeline, "
                                  "or use graphcache.optimize(transformer, ...) to run it by hand")
        steps, per_step = self.current.num_steps, len(self.run_models)
        if self.calls == steps * per_step:
            raise GraphcacheError(
                f"the pipeline called its transformer more than {steps * per_step} times in a {steps}-step run "
                f"({per_step} per step): schedulers that evaluate the model more than once per step (Heun, "
                "2nd-order DPM-Solver SDE) or pipelines that call it a varying number of times per step are not "
                "supported")
        model = self.run_models[self.calls % per_step]
        if model.spec is None and self.current.spec is not None:
            model.share_capture(self.current)  # the calls of a step take the same inputs: one export
        self.calls += 1
        return model(*args, **kwargs)


def _flux_calls_per_step(arguments: dict) -> int:
    """FluxPipeline guides by its guidance embedding, in one call; true CFG (true_cfg_scale > 1
    with a negative prompt, as text or as both embeddings) adds a call on the negative prompt."""
    negative = arguments.get("negative_prompt") is not None or (
        arguments.get("negative_prompt_embeds") is not None
        and arguments.get("negative_pooled_prompt_embeds") is not None)
    return 2 if arguments.get("true_cfg_scale", 1.0) > 1 and negative else 1


def _sd3_calls_per_step(arguments: dict) -> int:
    """StableDiffusion3Pipeline guides in one batch; skip-layer guidance adds a call on only some
    of the steps, which no fixed number of calls per step describes."""
    if arguments.get("skip_guidance_layers") is not None:
        raise GraphcacheError("StableDiffusion3Pipeline with skip_guidance_layers calls its transformer a third "
                              "time on some steps only: graphcache cannot schedule it (pass skip_guidance_layers=None)")
    return 1


# How many times one denoising step calls the transformer, by pipeline class, from the call's
# arguments. It is decided before the run from the arguments alone (no tensor is read, no device
# sync), because each call of a step needs its own cache from the run's first step on. A pipeline
# not listed calls it once per step (DiT and PixArt-α guide in one batch).
CALLS_PER_STEP = {
    "FluxPipeline": _flux_calls_per_step,
    "StableDiffusion3Pipeline": _sd3_calls_per_step,
}


def _call_arguments(call, pipe, args, kwargs) -> dict:
    """A pipeline call's arguments by name, defaults included."""
    bound = inspect.signature(call).bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _steps_of_call(pipe, arguments: dict) -> int:
    """The number of denoising steps a pipeline call will run."""
    for explicit in ("timesteps", "sigmas"):
        if arguments.get(explicit) is not None:
            return len(arguments[explicit])
    steps = arguments.get("num_inference_steps")
    if not isinstance(steps, int) or steps < 1:
        raise GraphcacheError(f"cannot tell how many steps this {type(pipe).__name__} call runs "
                              f"(num_inference_steps={steps!r})")
    return steps


def _cached_class(cls: type) -> type:
    """A subclass of the pipeline class whose calls each start a sampling run."""
    if cls not in _CACHED_CLASSES:
        calls_per_step = CALLS_PER_STEP.get(cls.__name__, lambda arguments: 1)

        def __call__(self, *args, **kwargs):
            arguments = _call_arguments(cls.__call__, self, args, kwargs)
            self.transformer.start_run(_steps_of_call(self, arguments), calls_per_step(arguments))
            return cls.__call__(self, *args, **kwargs)

        _CACHED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                           "_graphcache_original_class": cls})
    return _CACHED_CLASSES[cls]


def enable(pipe, method: str = "fora", *, backend: str = "eager", compile_options: dict | None = None, **options):
    """Run `pipe`'s transformer with `method` (and the method's `options`) on every call of `pipe`.
    Returns the pipeline. Each call is one sampling run with its own step count."""

    def wrap(transformer):
        cached = PipelineTransformer(transformer, method, backend, compile_options, options)
        if options.get("eoc"):  # another model or scheduler fails here; steps and resolution at each capture
            check_prior_model(options["eoc"], transformer)
            check_prior_sampler(options["eoc"], type(getattr(pipe, "scheduler", None)).__name__)
        return cached

    return install(pipe, wrap)


def install(pipe, wrap):
    """Replace `pipe`'s transformer by `wrap(transformer)`, a PipelineTransformer, and its class by
    one whose calls each start a sampling run. Returns the pipeline."""
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise GraphcacheError(f"{type(pipe).__name__} has no transformer module: graphcache caches DiT pipelines")
    if isinstance(transformer, PipelineTransformer):
        raise GraphcacheError("graphcache is already enabled on this pipeline: graphcache.disable(pipe) first")
    order = getattr(getattr(pipe, "scheduler", None), "order", 1)
    if order != 1:
        raise GraphcacheError(f"{type(pipe.scheduler).__name__} evaluates the model {order} times per step; "
                              "graphcache counts one transformer call per step: use a first-order scheduler "
                              "(DDIM, DPM-Solver multistep, Euler, flow-matching Euler)")
    cached = wrap(transformer)
    pipe.__dict__["transformer"] = cached  # not through the pipeline's __setattr__: its config stays as it is
    pipe.__class__ = _cached_class(type(pipe))
    return pipe


def disable(pipe):
    """Put back the transformer and the pipeline class `enable` replaced. Returns the pipeline."""
    cached = pipe.__dict__.get("transformer")
    if not isinstance(cached, PipelineTransformer):
        raise GraphcacheError("graphcache is not enabled on this pipeline")
    pipe.__dict__["transformer"] = cached.transformer
    pipe.__class__ = type(pipe)._graphcache_original_class
    return pipe
