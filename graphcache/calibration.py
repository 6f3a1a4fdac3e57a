"""Calibration of EOC's prior (graphcache/eoc.py): uncached sampling runs whose branch outputs are
recorded from the annotated graph of any captured model — its average over the calibration
samples gives the trends, the held-out samples the judgment's statistics.

The runs are graphcache's sampler on the built-in DiT (`calibrate`), or a diffusers pipeline with
its own scheduler and guidance (`calibrate_pipeline`: DiT from class labels, PixArt-α from prompt
embeddings), whose transformer runs a recording CachedModel of method none."""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
from torch import nn

from . import ir
from .diffusers_models import PIXART_CFG_SCALE
from .eoc import FORMAT, Prior, fingerprint, steps_read
from .errors import GraphcacheError
from .pipelines import PipelineTransformer, disable, install
from .runtime import CachedModel

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


class RecordingModel(CachedModel):
    """A CachedModel of method none, captured without hoisting (the plain model's arithmetic),
    whose variant reports every branch's ungated output to sink(step, branch, value)."""

    def __init__(self, model: nn.Module, num_steps: int, sink):
        object.__setattr__(self, "sink", sink)  # the built-in DiT is captured inside __init__
        super().__init__(model, "none", num_steps, hoist_conditioning=False)

    def _build_on(self, captured, spec, capture_inputs) -> None:
        super()._build_on(captured, spec, capture_inputs)
        gm = self.variants[self.schedule[0].variant]

        def run(*args):
            step = self.step_index
            return _RecordBranchOutputs(gm, lambda br, v: self.sink(step, br, v.detach())).run(*args)

        self.runners = {key: run for key in self.variants}


class _Statistics:
    """Where recorded branch outputs go: summed per step over the calibration runs, then, once
    `end_calibration` has made the trends, compared with the trend's prediction on held-out runs."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.sums: dict[str, list] = {}  # branch -> per step [sum over rows, rows]
        self.trend: dict[str, torch.Tensor] | None = None
        self.gain: dict[str, torch.Tensor] = {}
        self.norm: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}

    def __call__(self, step, branch, value):
        if self.trend is None:
            per_step = self.sums.setdefault(branch, [[0.0, 0] for _ in range(self.num_steps)])
            per_step[step][0] = per_step[step][0] + value.double().sum(0)
            per_step[step][1] += value.shape[0]
            return
        value = value.double()
        if step > 0:
            before = self.previous[branch]
            predicted = before * self.trend[branch][step - 1].double()
            self.gain[branch][step - 1] += float(((value - before) * predicted).sum())
            self.norm[branch][step - 1] += float((predicted * predicted).sum())
        self.previous[branch] = value

    def end_calibration(self) -> None:
        prior_mean = {br: torch.stack([total / n for total, n in per_step]) for br, per_step in self.sums.items()}
        self.trend = {br: (p[1:] - p[:-1]).float() for br, p in prior_mean.items()}
        self.gain = {br: torch.zeros(self.num_steps - 1, dtype=torch.float64) for br in self.trend}
        self.norm = {br: torch.zeros(self.num_steps - 1, dtype=torch.float64) for br in self.trend}


def _check_request(num_steps: int, samples: int, held_out: int, for_method: str | None, method_options) -> None:
    """GraphcacheError for a calibration that cannot be made, before any sampling run."""
    from .methods import get_method

    if for_method is not None:
        method = get_method(for_method)
        if not method.corrects:
            raise GraphcacheError(f"method {for_method} takes no eoc option: there is no schedule to calibrate for")
        stray = [name for name in method_options or {} if name.startswith("eoc")]
        if stray:
            raise GraphcacheError(f"calibrating for {for_method}: {stray[0]} is given where the prior is used, "
                                  "not to calibrate it")
        method.resolve_options(method_options or {})  # a bad option fails before the sampling runs
    if samples < 1 or held_out < 1:
        raise GraphcacheError("calibration needs at least one sample and one held-out sample")
    if num_steps < 2:
        raise GraphcacheError("EOC corrects a step by the trend from the step before: it needs 2+ steps")


def _make_prior(stats: _Statistics, structure, meta: dict, for_method, method_options) -> Prior:
    """The prior from the statistics, its metadata completed from the annotated graph, kept for
    the schedule of `for_method` (with `method_options`) when one is given."""
    from .methods import get_method
    from .methods.base import computed_branches

    num_steps = stats.num_steps
    meta = {"format": FORMAT, **meta, "num_steps": num_steps, "num_tokens": structure.num_tokens,
            "hidden_size": structure.hidden_size, "calibration_seed": CALIBRATION_SEED,
            "held_out_seed": HELD_OUT_SEED, "branches": {br.name: br.block for br in structure.branches},
            "kinds": {br.name: br.kind for br in structure.branches}, "steps": list(range(1, num_steps))}
    prior = Prior(meta, stats.trend, stats.gain, stats.norm)
    if for_method is None:
        return prior
    schedule = get_method(for_method).schedule(num_steps, structure.depth, method_options, structure.num_tokens,
                                               structure)
    branches = {br.name: (br.block, br.kind) for br in structure.branches}
    keep = steps_read(computed_branches(schedule.steps, branches), branches)
    prior = prior.keep_steps(keep)
    prior.meta["for"] = {"method": for_method, "options": dict(method_options or {})}
    return prior


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrate eoc", unit="sample-step")


def calibrate(model: nn.Module, num_steps: int, *, samples: int | None = None, held_out: int | None = None,
              batch: int = 16, sampler: str = "ddim", cfg_scale: float | None = 1.5,
              for_method: str | None = None, method_options: dict | None = None,
              progress: bool = False) -> Prior:
    """EOC's prior for `model` sampled by graphcache's sampler: `samples` uncached runs (default
    one per class, classes in order, noise from CALIBRATION_SEED on) give P; `held_out` more
    (default as many, noise from HELD_OUT_SEED on) give the judgment's statistics.

    Every step's trend is kept (the large form: DiT-XL/2 over 20 steps takes 1.3 GB) unless
    `for_method` names the caching method (with `method_options`, EOC's own aside) whose schedule
    the prior will serve: then only the steps where that schedule leaves some branch uncomputed,
    the ones its factors read."""
    from .sampling import sample

    classes = int(model.num_classes)
    samples = classes if samples is None else samples
    held_out = samples if held_out is None else held_out
    _check_request(num_steps, samples, held_out, for_method, method_options)
    stats = _Statistics(num_steps)
    recorder = RecordingModel(model, num_steps, stats)
    bar = _progress(progress, (samples + held_out) * num_steps)

    def run(count, seed0):
        for i, start in enumerate(range(0, count, batch)):
            labels = [(start + j) % classes for j in range(min(batch, count - start))]
            sample(recorder, labels, seed=seed0 + i, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale)
            if bar is not None:
                bar.update(len(labels) * num_steps)

    run(samples, CALIBRATION_SEED)
    stats.end_calibration()
    run(held_out, HELD_OUT_SEED)
    if bar is not None:
        bar.close()
    meta = {"fingerprint": fingerprint(model), "sampler": sampler, "cfg_scale": cfg_scale, "samples": samples,
            "held_out": held_out}
    return _make_prior(stats, recorder.structure, meta, for_method, method_options)


class _RecordingTransformer(PipelineTransformer):
    """The transformer a pipeline calls during calibration: each run's CachedModel records."""

    def __init__(self, transformer: nn.Module, sink):
        super().__init__(transformer, "none", "eager", None, {})
        self.sink = sink

    def new_model(self, num_steps: int) -> CachedModel:
        return RecordingModel(self.transformer, num_steps, self.sink)


def _dit_calls(pipe, samples, held_out, batch, cfg_scale):
    """DiTPipeline calls, as (samples, call): class labels in turn (one per class by default),
    `batch` per call, guidance `cfg_scale` (default the pipeline's)."""
    classes = int(pipe.transformer.config.num_embeds_ada_norm)
    samples = classes if samples is None else samples
    held_out = samples if held_out is None else held_out
    if cfg_scale is None:
        cfg_scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default

    def calls(count):
        return [(min(batch, count - start),
                 dict(class_labels=[(start + j) % classes for j in range(min(batch, count - start))],
                      guidance_scale=cfg_scale, output_type="pt")) for start in range(0, count, batch)]

    return samples, held_out, calls(samples), calls(held_out), cfg_scale


def _pixart_calls(transformer, vae_scale_factor, samples, held_out, batch, cfg_scale, prompts: dict):
    """PixArtAlphaPipeline calls on saved prompt embeddings, as (samples, call): the first `samples`
    prompts calibrate (default: the first half, rounded up), the next `held_out` (default: the
    rest) are judged."""
    embeds, mask = prompts["prompt_embeds"], prompts.get("prompt_attention_mask")
    mask = torch.ones(embeds.shape[:2]) if mask is None else mask
    negative, negative_mask = prompts.get("negative_prompt_embeds"), prompts.get("negative_prompt_attention_mask")
    count = embeds.shape[0]
    if samples is None:
        samples = count - held_out if held_out is not None else count - count // 2
    held_out = count - samples if held_out is None else held_out
    if samples + held_out > count:
        raise GraphcacheError(f"{samples} calibration and {held_out} held-out prompts need {samples + held_out} "
                              f"prompt embeddings, found {count}")
    if cfg_scale is None:
        cfg_scale = PIXART_CFG_SCALE if negative is not None else 1.0
    if negative is not None and negative.shape[0] not in (1, count):
        raise GraphcacheError(f"{negative.shape[0]} negative prompt embeddings for {count} prompts: give one, "
                              "or one per prompt")
    if cfg_scale > 1 and negative is None:
        raise GraphcacheError("guidance (cfg scale above 1) needs the negative prompt embeddings")
    size = transformer.config.sample_size * vae_scale_factor

    def rows(tensor, start, stop):  # one negative prompt serves every prompt
        return tensor[start:stop] if tensor.shape[0] > 1 else tensor.expand(stop - start, *tensor.shape[1:])

    def calls(first, stop):
        out = []
        for start in range(first, stop, batch):
            end = min(start + batch, stop)
            call = dict(prompt=None, negative_prompt=None, prompt_embeds=embeds[start:end],
                        prompt_attention_mask=mask[start:end], guidance_scale=cfg_scale, height=size, width=size,
                        use_resolution_binning=False, output_type="latent")
            if negative is not None:
                call["negative_prompt_embeds"] = rows(negative, start, end)
                nmask = torch.ones(negative.shape[:2]) if negative_mask is None else negative_mask
                call["negative_prompt_attention_mask"] = rows(nmask, start, end)
            out.append((end - start, call))
        return out

    return samples, held_out, calls(0, samples), calls(samples, samples + held_out), cfg_scale


def calibrate_pipeline(pipe, num_steps: int, *, samples: int | None = None, held_out: int | None = None,
                       batch: int = 16, cfg_scale: float | None = None, prompts: dict | None = None,
                       for_method: str | None = None, method_options: dict | None = None,
                       progress: bool = False) -> Prior:
    """EOC's prior for a diffusers pipeline's transformer, sampled by the pipeline itself (its
    scheduler, its guidance in one batch): the prior `graphcache.enable(pipe, method, eoc=PRIOR)`
    takes for `num_steps`-step runs.

    DiTPipeline: class labels in turn (`samples` default one per class, `held_out` as many),
    guidance `cfg_scale` (default the pipeline's). PixArtAlphaPipeline: `prompts` holds
    prompt_embeds (n, L, C) and optionally prompt_attention_mask, negative_prompt_embeds (one row
    or n) and its mask; each prompt is one sample, the first `samples` calibrate and the next
    `held_out` are judged; guidance `cfg_scale` (default 4.5 with negative embeddings, else none).
    Noise comes from seeds CALIBRATION_SEED on (one per call of `batch` samples), held-out noise
    from HELD_OUT_SEED on. `for_method` as for `calibrate`."""
    name = type(pipe).__name__
    transformer = pipe.transformer
    if name == "DiTPipeline":
        if prompts is not None:
            raise GraphcacheError("a DiT pipeline is calibrated on class labels: prompt embeddings apply to PixArt-α")
        samples, held_out, calibration_calls, held_out_calls, cfg_scale = _dit_calls(pipe, samples, held_out, batch,
                                                                                     cfg_scale)
    elif name == "PixArtAlphaPipeline":
        if prompts is None or prompts.get("prompt_embeds") is None:
            raise GraphcacheError("a PixArt-α pipeline is calibrated on prompt embeddings: pass prompt_embeds "
                                  "(CLI: --prompt-embeds FILE)")
        samples, held_out, calibration_calls, held_out_calls, cfg_scale = _pixart_calls(
            transformer, pipe.vae_scale_factor, samples, held_out, batch, cfg_scale, prompts)
    else:
        raise GraphcacheError(f"calibration runs DiT and PixArt-α pipelines, not a {name}")
    _check_request(num_steps, samples, held_out, for_method, method_options)
    stats = _Statistics(num_steps)
    bar = _progress(progress, (samples + held_out) * num_steps)

    def run(calls, seed0):
        for i, (rows, call) in enumerate(calls):
            pipe(**call, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(seed0 + i))
            if bar is not None:
                bar.update(rows * num_steps)

    install(pipe, lambda model: _RecordingTransformer(model, stats))
    try:
        run(calibration_calls, CALIBRATION_SEED)
        stats.end_calibration()
        run(held_out_calls, HELD_OUT_SEED)
        structure = pipe.transformer.current.structure
    finally:
        disable(pipe)
        if bar is not None:
            bar.close()
    meta = {"fingerprint": fingerprint(transformer), "sampler": type(pipe.scheduler).__name__, "pipeline": name,
            "cfg_scale": cfg_scale, "samples": samples, "held_out": held_out}
    return _make_prior(stats, structure, meta, for_method, method_options)
