"""Calibration of EOC's prior (graphcache/eoc.py): uncached sampling runs whose branch outputs are
recorded from the annotated graph of any captured model — its average over the calibration
samples gives the trends, the held-out samples the judgment's statistics."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from . import ir
from .eoc import FORMAT, Prior, fingerprint, steps_read
from .errors import GraphcacheError

CALIBRATION_SEED = 1000  # calibration batches draw noise from seeds 1000, 1001, ...
HELD_OUT_SEED = 2000  # held-out batches from 2000, 2001, ...: both away from evaluation seeds 0..999

class _RecordBranchOutputs(fx.Interpreter):
    """Runs a variant and hands every branch's ungated output (by branch name) to `sink`."""

    def __init__(self, gm: fx.GraphModule, sink):
        super().__init__(gm)
        self.names = {br.branch_out: br.name for br in ir.structure_of(gm).branches}
        self.sink = sink

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.names:
            self.sink(self.names[n.name], value)
        return value


def _recording_model(model, num_steps: int, sink):
    """A CachedModel of `model` with method none whose variant reports its branch outputs to
    sink(step, branch, value)."""
    from .runtime import CachedModel

    cached = CachedModel(model, "none", num_steps, hoist_conditioning=False)
    gm = cached.variants[cached.schedule[0].variant]

    def run(*args):
        step = cached.step_index
        return _RecordBranchOutputs(gm, lambda br, v: sink(step, br, v.detach())).run(*args)

    cached.runners = {key: run for key in cached.variants}
    return cached


def calibrate(model: nn.Module, num_steps: int, *, samples: int | None = None, held_out: int | None = None,
              batch: int = 16, sampler: str = "ddim", cfg_scale: float | None = 1.5,
              for_method: str | None = None, method_options: dict | None = None,
              progress: bool = False) -> Prior:
    """EOC's prior for `model`: `samples` uncached runs (default one per class, classes in order,
    noise from CALIBRATION_SEED on) give P; `held_out` more (default as many, noise from
    HELD_OUT_SEED on) give the judgment's statistics.

    Every step's trend is kept (the large form: DiT-XL/2 over 20 steps takes 1.3 GB) unless
    `for_method` names the caching method (with `method_options`, EOC's own aside) whose schedule
    the prior will serve: then only the steps where that schedule leaves some branch uncomputed,
    the ones its factors read."""
    from .methods import get_method
    from .methods.base import computed_branches
    from .sampling import sample

    if for_method is not None:
        method = get_method(for_method)
        if not method.corrects:
            raise GraphcacheError(f"method {for_method} takes no eoc option: there is no schedule to calibrate for")
        stray = [name for name in method_options or {} if name.startswith("eoc")]
        if stray:
            raise GraphcacheError(f"calibrating for {for_method}: {stray[0]} is given where the prior is used, "
                                  "not to calibrate it")
        method.resolve_options(method_options or {})  # a bad option fails before the sampling runs

    classes = int(model.num_classes)
    samples = classes if samples is None else samples
    held_out = samples if held_out is None else held_out
    if samples < 1 or held_out < 1:
        raise GraphcacheError("calibration needs at least one sample and one held-out sample")
    if num_steps < 2:
        raise GraphcacheError("EOC corrects a step by the trend from the step before: it needs 2+ steps")
    sums: dict[str, list] = {}  # branch -> per step [sum over rows, rows]

    def accumulate(step, branch, value):
        per_step = sums.setdefault(branch, [[0.0, 0] for _ in range(num_steps)])
        per_step[step][0] = per_step[step][0] + value.double().sum(0)
        per_step[step][1] += value.shape[0]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(samples + held_out) * num_steps, desc="calibrate eoc", unit="sample-step")

    def run(sink, count, seed0):
        recorder = _recording_model(model, num_steps, sink)
        for i, start in enumerate(range(0, count, batch)):
            labels = [(start + j) % classes for j in range(min(batch, count - start))]
            sample(recorder, labels, seed=seed0 + i, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale)
            if bar is not None:
                bar.update(len(labels) * num_steps)
        return recorder

    recorder = run(accumulate, samples, CALIBRATION_SEED)
    structure = recorder.structure
    prior_mean = {br: torch.stack([total / n for total, n in per_step]) for br, per_step in sums.items()}
    trend = {br: (p[1:] - p[:-1]).float() for br, p in prior_mean.items()}

    gain = {br: torch.zeros(num_steps - 1, dtype=torch.float64) for br in trend}
    norm = {br: torch.zeros(num_steps - 1, dtype=torch.float64) for br in trend}
    previous: dict[str, torch.Tensor] = {}

    def judge(step, branch, value):
        value = value.double()
        if step > 0:
            before = previous[branch]
            predicted = before * trend[branch][step - 1].double()
            gain[branch][step - 1] += float(((value - before) * predicted).sum())
            norm[branch][step - 1] += float((predicted * predicted).sum())
        previous[branch] = value

    run(judge, held_out, HELD_OUT_SEED)
    if bar is not None:
        bar.close()
    meta = {
        "format": FORMAT, "fingerprint": fingerprint(model), "sampler": sampler, "num_steps": num_steps,
        "cfg_scale": cfg_scale, "num_tokens": structure.num_tokens, "hidden_size": structure.hidden_size,
        "samples": samples, "held_out": held_out, "calibration_seed": CALIBRATION_SEED,
        "held_out_seed": HELD_OUT_SEED, "branches": {br.name: br.block for br in structure.branches},
        "kinds": {br.name: br.kind for br in structure.branches}, "steps": list(range(1, num_steps)),
    }
    prior = Prior(meta, trend, gain, norm)
    if for_method is None:
        return prior
    schedule = method.schedule(num_steps, structure.depth, method_options, structure.num_tokens, structure)
    branches = {br.name: (br.block, br.kind) for br in structure.branches}
    keep = steps_read(computed_branches(schedule.steps, branches), branches)
    prior = prior.keep_steps(keep)
    prior.meta["for"] = {"method": for_method, "options": dict(method_options or {})}
    return prior
