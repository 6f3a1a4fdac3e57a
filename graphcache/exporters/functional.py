"""Running functional variants: what every ahead-of-time backend (aoti, onnx) shares.

`functionalize` (passes/functionalize.py) splits a variant into an eager prologue (random draws),
a pure main graph `(inputs…, cache…, random…) -> (out, cache…, host…)` that a backend exports,
and an eager epilogue (K-means). `FunctionalRunner` calls the three in order with one dict of
named values, and keeps the cache between calls by swapping the `CacheState` buffers for the
graphs' new cache values (no copies).

Per-step inputs become tensors: a token count k becomes `torch.empty(k)` (its size is read in the
graph), every other scalar a 0-d tensor (int64 / float32), cached per value; a tensor (EOC's
factors) is passed as it is, already on the device and in the dtype the graph was exported for.
"""

from __future__ import annotations

import torch

from ..passes.functionalize import CACHE_PREFIX, NEW_CACHE_PREFIX, OUTPUT, Signature
from ..schedule import compiled_token_count, is_token_input


class ScalarTensors:
    """0-d tensors for per-step Python scalars, made once per (input, value, device): int64 for
    ints, float32 for floats, so `tensor_f32 * t` computes as `tensor_f32 * python_scalar` does
    (the scalar is rounded to float32 either way; a float64 0-d input would also make Dynamo
    recompile a variant once, as it does for the Python floats it turns into tensors).
    One tensor per input name: two inputs with the same value must not be the same object (a
    compiled graph guards on which of its inputs alias and would recompile when that changes)."""

    def __init__(self):
        self._made: dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, value, device) -> torch.Tensor:
        key = (name, type(value), value, str(device))
        t = self._made.get(key)
        if t is None:
            dtype = torch.float32 if isinstance(value, float) else torch.int64
            t = self._made[key] = torch.tensor(value, dtype=dtype, device=device)
        return t


def step_tensor(name: str, value, device, scalars: ScalarTensors) -> torch.Tensor:
    """The tensor a functional graph takes for the per-step input `name` = `value`."""
    if isinstance(value, torch.Tensor):
        return value
    if is_token_input(name):
        return torch.empty(compiled_token_count(name, int(value)), device=device)
    return scalars(name, value, device)


class FunctionalRunner:
    """Runs one functional variant: prologue (eager) -> main (a backend's callable) -> epilogue.

    `main(*tensors)` takes `sig.inputs` in order and returns `sig.outputs` in order. `arg_names`
    are the names of the model's positional inputs (x, t, y). `prologue`/`epilogue` default to
    the signature's GraphModules; loaded artifacts pass their exported programs' modules instead.
    """

    def __init__(self, sig: Signature, main, cache, arg_names, prologue=None, epilogue=None):
        self.sig, self.main, self.cache = sig, main, cache
        self.arg_names = list(arg_names)
        self.prologue = prologue if prologue is not None else sig.prologue
        self.epilogue = epilogue if epilogue is not None else sig.epilogue
        self.scalars = ScalarTensors()
        # resolved once: (graph input name, cache slot) for every slot any of the three graphs reads
        names = dict.fromkeys(sig.inputs + sig.prologue_inputs + sig.epilogue_inputs)
        self.cache_inputs = [(n, n.removeprefix(CACHE_PREFIX)) for n in names if n.startswith(CACHE_PREFIX)]
        self.cache_outputs = [(NEW_CACHE_PREFIX + slot, slot) for slot in sig.cache_outputs()]

    def values(self, args, kwargs) -> dict:
        """The named inputs of the three graphs for this call (cache slots included)."""
        device = args[0].device
        env = dict(zip(self.arg_names, args))
        for name, value in kwargs.items():
            env[name] = step_tensor(name, value, device, self.scalars)
        buffers = self.cache._buffers
        for name, slot in self.cache_inputs:
            env[name] = buffers[slot]
        return env

    def __call__(self, *args, **kwargs):
        env = self.values(args, kwargs)
        if self.prologue is not None:
            draws = self.prologue(*(env[n] for n in self.sig.prologue_inputs))
            env.update(zip(self.sig.prologue_outputs, draws))
        outs = self.main(*(env[n] for n in self.sig.inputs))
        env.update(zip(self.sig.outputs, outs))
        if self.epilogue is not None:
            outs = self.epilogue(*(env[n] for n in self.sig.epilogue_inputs))
            env.update(zip(self.sig.epilogue_outputs, outs))
        for name, slot in self.cache_outputs:
            self.cache._buffers[slot] = env[name]
        return env[OUTPUT]


__all__ = ["FunctionalRunner", "ScalarTensors", "step_tensor"]
