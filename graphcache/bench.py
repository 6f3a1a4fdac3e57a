"""Wall-clock measurement of sampling runs (grows into `graphcache bench`).

Every figure is a median over repeated full sampling runs, after warm-up runs that are not
counted, measured with `time.perf_counter` around `graphcache.sample` (device work included:
CUDA is synchronised before the clock stops).
"""

from __future__ import annotations

import statistics
import time

import torch

from .errors import GraphcacheError
from .sampling import sample

__all__ = ["time_sampling"]


def _sync(model) -> None:
    if torch.cuda.is_available():
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def time_sampling(model, *, labels, num_steps: int = 50, sampler: str = "ddim", cfg_scale: float | None = 1.5,
                  repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Time `repeats` full sampling runs of `model` (a DiT or a CachedModel) after `warmup` runs.

    Returns {"seconds": median, "all": [seconds of each timed run]}.
    """
    if repeats < 1:
        raise GraphcacheError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise GraphcacheError(f"warmup must be >= 0, got {warmup}")

    def run():
        return sample(model, labels, seed=seed, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale)

    for _ in range(warmup):
        run()
        _sync(model)
    times = []
    for _ in range(repeats):
        _sync(model)
        start = time.perf_counter()
        run()
        _sync(model)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "all": times}
