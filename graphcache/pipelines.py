"""`graphcache.enable(pipe, method=...)`: a diffusers pipeline whose transformer runs cached.

The pipeline's transformer is replaced by a `PipelineTransformer`, a drop-in module that holds one
CachedModel per distinct step count (built on the first call that asks for it, reused after), and
the pipeline's class by a subclass whose `__call__` starts a sampling run: it reads the call's
step count (`num_inference_steps`, or the length of explicit `timesteps` / `sigmas`), resets the
cache and counts the transformer's calls from 0. The step index is that count, never a timestep
value (DPM-Solver's timesteps are not uniform). Classifier-free guidance is whatever batch the
pipeline passes: DiT and PixArt-α concatenate the unconditional and conditional halves into one
call, which is one step.

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
from .runtime import CachedModel, DelegatesToModel

_CACHED_CLASSES: dict[type, type] = {}


class PipelineTransformer(DelegatesToModel, nn.Module):
    """The transformer a pipeline calls while graphcache is enabled: it runs the CachedModel of the
    current run's step count, and refuses a run that calls it more often than it has steps."""

    _delegate = "transformer"

    def __init__(self, transformer: nn.Module, method: str, backend: str, compile_options, options: dict):
        super().__init__()
        self.transformer = transformer
        self.method, self.backend, self.compile_options, self.options = method, backend, compile_options, options
        self.by_steps = nn.ModuleDict()  # str(num_steps) -> CachedModel
        self.current: CachedModel | None = None
        self.calls = 0
        # unknown methods, options and backends fail at enable(), not at the first pipeline call
        get_method(method).resolve_options(options)
        get_backend(backend, compile_options)

    def start_run(self, num_steps: int) -> None:
        key = str(num_steps)
        if key not in self.by_steps:
            self.by_steps[key] = CachedModel(self.transformer, self.method, num_steps=num_steps, backend=self.backend,
                                             compile_options=self.compile_options, **self.options)
        self.current = self.by_steps[key]
        self.current.reset()
        self.calls = 0

    def forward(self, *args, **kwargs):
        if self.current is None:
            raise GraphcacheError("the cached transformer was called outside a pipeline call: call the pipeline, "
                                  "or use graphcache.optimize(transformer, ...) to run it by hand")
        if self.calls == self.current.num_steps:
            raise GraphcacheError(
                f"the pipeline called its transformer more than {self.current.num_steps} times in a "
                f"{self.current.num_steps}-step run: schedulers that evaluate the model more than once per step "
                "(Heun, 2nd-order DPM-Solver SDE) or pipelines that call it once per guidance branch are not supported")
        self.calls += 1
        return self.current(*args, **kwargs)


def _steps_of_call(call, pipe, args, kwargs) -> int:
    """The number of denoising steps a pipeline call will run."""
    bound = inspect.signature(call).bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
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
        def __call__(self, *args, **kwargs):
            self.transformer.start_run(_steps_of_call(cls.__call__, self, args, kwargs))
            return cls.__call__(self, *args, **kwargs)

        _CACHED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                           "_graphcache_original_class": cls})
    return _CACHED_CLASSES[cls]


def enable(pipe, method: str = "fora", *, backend: str = "eager", compile_options: dict | None = None, **options):
    """Run `pipe`'s transformer with `method` (and the method's `options`) on every call of `pipe`.
    Returns the pipeline. Each call is one sampling run with its own step count."""
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
    cached = PipelineTransformer(transformer, method, backend, compile_options, options)
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
