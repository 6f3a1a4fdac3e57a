"""The sampling-loop side every runnable optimized model shares: a CachedModel (graphcache/runtime.py)
and a loaded ahead-of-time artifact (graphcache/aot_artifact.py) both step through a schedule,
one runner per step, with the cache allocated for the current input signature."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import GraphcacheError

# Attributes of the wrapped model that samplers read (latent shape, classes, sigma channels);
# an optimized model carries them too, so that it can stand in for the model
MODEL_ATTRS = ("in_channels", "input_size", "learn_sigma", "num_classes", "out_channels", "patch_size")


def model_attributes(model: nn.Module) -> dict:
    """The MODEL_ATTRS `model` has: its own (graphcache's DiT) or its config's (diffusers' models
    keep them in `config`, and reading them off the model is deprecated there)."""
    config = getattr(model, "config", None)
    found = {**(config if isinstance(config, dict) else {}), **vars(model)}
    return {a: found[a] for a in MODEL_ATTRS if a in found}


class SteppedModel(nn.Module):
    """The sampling-loop side shared by CachedModel and exported artifacts (graphcache/aot_artifact.py):
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
