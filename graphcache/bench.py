"""Wall-clock measurement of sampling runs (grows into `graphcache bench`).

Every figure is a median over repeated full sampling runs, after warm-up runs that are not
counted, measured with `time.perf_counter` around `graphcache.sample` (device work included:
CUDA is synchronised before the clock stops).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from .diffusers_models import FLOW_MATCHING_SCHEDULER, PIXART_CFG_SCALE, PIXART_TEXT_TOKENS, TEXT_PIPELINE_SCHEDULER
from .errors import GraphcacheError
from .sampling import sample

__all__ = ["BenchSession", "FluxBenchSession", "PipelineBenchSession", "PixArtBenchSession", "bench", "format_table",
           "pipeline_session", "plot", "time_sampling"]


def _sync(model) -> None:
    if torch.cuda.is_available():
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _timed_run(model, run):
    """(seconds, output) of one call of `run` (device work included)."""
    _sync(model)
    start = time.perf_counter()
    out = run()
    _sync(model)
    return time.perf_counter() - start, out


def _sampling_run(model, labels, num_steps, sampler, cfg_scale, guidance, seed):
    """A call that samples one run of `model` (the same seeds every time)."""
    return lambda: sample(model, labels, seed=seed, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale,
                          guidance=guidance)


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise GraphcacheError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise GraphcacheError(f"warmup must be >= 0, got {warmup}")


def time_sampling(model, *, labels, num_steps: int = 50, sampler: str = "ddim", cfg_scale: float | None = 1.5,
                  guidance: str = "official", repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Time `repeats` full sampling runs of `model` (a DiT or a CachedModel) after `warmup` runs.

    Returns {"seconds": median, "all": [seconds of each timed run], "output": the last run's samples}
    (every run uses the same seed, so every run's output is the same).
    """
    _check_counts(repeats, warmup)
    run = _sampling_run(model, labels, num_steps, sampler, cfg_scale, guidance, seed)
    for _ in range(warmup):
        _timed_run(model, run)
    times = []
    for _ in range(repeats):
        seconds, out = _timed_run(model, run)
        times.append(seconds)
    return {"seconds": statistics.median(times), "all": times, "output": out}


FLOPS_COUNTING = (
    "FLOPs as the ToCa / DuCa / ClusCa papers count them (graphcache.flops): transformer blocks only "
    "(embedders and final "
    "layer excluded), attention counted analytically (projections, QK^T, softmax, AV) so an SDPA "
    "kernel is never undercounted, adaLN and LayerNorm included; token gather/scatter, top-k, "
    "scoring, clustering and Taylor forecasts count 0."
)


def _labels(model, batch: int) -> list[int]:
    return [i % model.num_classes for i in range(batch)]


def _peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set (monotonic:
    it can only show the largest run so far)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _quality(out, reference, labels, pixel: bool, digits) -> dict:
    from . import metrics

    same = out is reference
    q = {
        "psnr": None if same else metrics.psnr(out, reference, data_range=2.0 if pixel else None),
        # SSIM's 11x11 window needs images at least that large
        "ssim": None if same or min(out.shape[-2:]) < 11 else metrics.ssim(out, reference, data_range=2.0 if pixel else None),
        "rel_l2": metrics.rel_l2(out, reference),
        "cosine": metrics.cosine(out, reference),
        "accuracy": None,
        "fd": None,
    }
    if digits is not None:
        q["accuracy"] = digits.accuracy(out, labels)
        q["fd"] = metrics.frechet_distance(digits.features(out), metrics.reference_features())
    return q


def _digit_classifier(model):
    """The shipped MNIST classifier, for models that generate MNIST digits (1 channel, 10 classes)."""
    if model.in_channels != 1 or model.num_classes != 10:
        return None
    from .metrics import MnistClassifier

    try:
        return MnistClassifier.pretrained()
    except Exception:  # no shipped classifier: the figures that need it stay null
        return None


def _check_backend(backend: str, compile_options) -> None:
    from .exporters import BACKENDS

    if backend not in BACKENDS:
        raise GraphcacheError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if compile_options and backend != "compile":
        raise GraphcacheError(f"compile options need backend 'compile' (backend is {backend!r})")


class BenchSession:
    """The parts of `bench` — build a method, run it once, report its figures — for callers that
    order the runs themselves (tools/gpu_bench.py runs under a time budget).

    An entry is a dict: name, cached (the CachedModel), build_seconds, times (timed runs), output
    (the last timed run's samples), peak (bytes). `report(entry, base)` gives the figures of one
    method against `base`, the `none` entry built by the same session. `interleaved`: whether the
    entries ran in rounds, which decides how a speedup is paired (see `report`).
    """

    def __init__(self, model, *, backend: str = "eager", compile_options: dict | None = None,
                 hoist_conditioning: bool = True, num_steps: int = 50, batch: int = 1, sampler: str = "ddim",
                 cfg_scale: float | None = 1.5, guidance: str = "official", seed: int = 0,
                 interleaved: bool = True):
        _check_backend(backend, compile_options)
        self.model, self.backend, self.compile_options = model, backend, compile_options
        self.hoist_conditioning, self.num_steps, self.batch = hoist_conditioning, num_steps, batch
        self.sampler, self.cfg_scale, self.guidance, self.seed = sampler, cfg_scale, guidance, seed
        self.interleaved = interleaved
        self.text_tokens = None  # class-conditional: no caption
        self.labels = _labels(model, batch)
        self.cfg = cfg_scale is not None and cfg_scale > 1.0
        self.pixel = model.in_channels in (1, 3)
        self.digits = _digit_classifier(model)
        self.device = next(model.parameters()).device

    def build(self, name: str, options: dict) -> dict:
        """A new entry: `name` with `options` optimized for this session's backend."""
        from .runtime import optimize

        start = time.perf_counter()
        cached = optimize(self.model, name, num_steps=self.num_steps, backend=self.backend,
                          compile_options=self.compile_options, hoist_conditioning=self.hoist_conditioning,
                          **options)
        # capture + passes (+ export for aoti/onnx), not timed runs
        return {"name": name, "cached": cached, "build_seconds": time.perf_counter() - start,
                "times": [], "output": None, "peak": 0}

    def run(self, entry: dict, timed: bool) -> float:
        """One sampling run of `entry` (the same seeds every time); its seconds. A timed run is
        recorded in the entry, with its samples and peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds, out = _timed_run(self.model, self.sampling_run(entry))
        if timed:
            entry["times"].append(seconds)
            entry["output"], entry["peak"] = out, max(entry["peak"], _peak_memory_bytes(self.device))
        return seconds

    def sampling_run(self, entry: dict):
        """A call that samples one run of `entry` (the same seeds every time)."""
        cached = entry["cached"]
        return _sampling_run(cached, self.labels, self.num_steps, self.sampler, self.cfg_scale, self.guidance,
                             self.seed)

    def cached(self, entry: dict):
        """The CachedModel an entry runs."""
        return entry["cached"]

    def release(self, entry: dict) -> None:
        """Free an entry's variants (onnxruntime sessions: a copy of the weights each); its report stays."""
        del entry["cached"]

    def flops(self, cached) -> dict:
        from .flops import model_dims, schedule_flops

        dims = model_dims(self.model, self.text_tokens, cached.structure.num_tokens)
        return schedule_flops(cached.schedule, **{**dims, "batch": self.batch * (2 if self.cfg else 1)})

    def report(self, entry: dict, base: dict) -> dict:
        """The figures of one method; `base`: the `none` entry. Interleaved, the speedup is the
        median of each round's ratio, `none`'s run over this method's run of the same round:
        that pairs runs made minutes apart, not the best run of one with the worst of the other."""
        cached, out, seconds = self.cached(entry), entry["output"], statistics.median(entry["times"])
        flops = self.flops(cached)
        if self.interleaved:
            speedup = statistics.median(b / t for b, t in zip(base["times"], entry["times"]))
        else:
            speedup = statistics.median(base["times"]) / seconds
        return {
            "method": entry["name"],
            "options": cached.options,
            "seconds": seconds,
            "seconds_all": entry["times"],
            "build_seconds": entry["build_seconds"],
            "speedup": speedup,
            "flops": flops["total"],
            "flops_uncached": flops["uncached"],
            "flops_speedup": flops["speedup"],
            "realization": speedup / flops["speedup"],
            **_quality(out, base["output"], self.labels, self.pixel, self.digits),
            "peak_memory_bytes": entry["peak"],
            "cache_bytes": cached.cache.nbytes(),
            "kinds": [list(p.kinds) for p in cached.schedule.steps],
        }

    def summary(self, results: list[dict], model_name: str = "") -> dict:
        """The bench report around the per-method `results`."""
        compiled = None
        if self.backend == "compile":
            import json

            from .exporters.compile import compile_options as resolve

            # a callable compiler: its repr
            compiled = json.loads(json.dumps(resolve(self.compile_options), default=repr))
        return {
            "model": model_name,
            "backend": self.backend,
            "compile_options": compiled,
            "steps": self.num_steps,
            "batch": self.batch,
            "sampler": self.sampler,
            "cfg_scale": self.cfg_scale,
            "guidance": self.guidance,
            "device": str(self.device),
            "interleaved": self.interleaved,
            "flops_counting": FLOPS_COUNTING,
            "results": results,
        }


class PipelineBenchSession(BenchSession):
    """bench through `graphcache.enable(pipe)`, for text-conditioned transformers: every method
    samples in its own diffusers pipeline around the shared transformer, with the scheduler the
    model ships with and the pipeline's guidance, from seeded random prompt embeddings of
    `text_tokens` tokens (no text encoder runs), at the square resolution of `image_tokens` image
    tokens. The pipelines return latents: the VAE decode, the same for every method, is not timed,
    and fidelity is measured on the latents.

    A subclass per model gives its pipeline's scheduler, its defaults (steps, guidance scale, text
    and image tokens), whether its guidance doubles the transformer's batch, the latent pixels per
    side of an image token, and the prompt arguments of a call."""

    scheduler: str
    default_steps: int
    default_guidance_scale: float
    default_text_tokens: int
    guides_in_batch: bool  # classifier-free guidance's two halves in one transformer call

    def __init__(self, transformer, *, backend: str = "eager", compile_options: dict | None = None,
                 num_steps: int | None = None, batch: int = 1, guidance_scale: float | None = None, seed: int = 0,
                 text_tokens: int | None = None, image_tokens: int | None = None, interleaved: bool = True):
        _check_backend(backend, compile_options)
        self.model, self.backend, self.compile_options = transformer, backend, compile_options
        self.num_steps, self.batch, self.seed = num_steps or self.default_steps, batch, seed
        self.cfg_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.text_tokens = text_tokens or self.default_text_tokens
        self.image_tokens = image_tokens or self.default_image_tokens()
        self.tokens_per_side = round(self.image_tokens ** 0.5)
        if self.tokens_per_side ** 2 != self.image_tokens:
            raise GraphcacheError(f"bench samples square images: {self.image_tokens} image tokens is not a square")
        self.interleaved, self.hoist_conditioning = interleaved, True
        self.sampler, self.guidance = self.scheduler, "pipeline"
        self.labels, self.pixel, self.digits = None, False, None
        self.cfg = self.guides_in_batch and self.cfg_scale > 1.0
        self.device = next(transformer.parameters()).device
        self.prompts = self.prompt_arguments(torch.Generator().manual_seed(seed + 1))

    def default_image_tokens(self) -> int:
        raise NotImplementedError

    def latent_pixels_per_token(self) -> int:
        """Latent pixels per side of one image token."""
        raise NotImplementedError

    def prompt_arguments(self, generator: torch.Generator) -> dict:
        """The pipeline's prompt arguments: random embeddings drawn from `generator`."""
        raise NotImplementedError

    def build(self, name: str, options: dict) -> dict:
        from .diffusers_models import text_pipeline
        from .pipelines import enable

        start = time.perf_counter()
        pipe = enable(text_pipeline(self.model), name, backend=self.backend, compile_options=self.compile_options,
                      **options)
        pipe.set_progress_bar_config(disable=True)
        # capture and passes happen at the first pipeline call (a warm-up run unless warmup=0)
        return {"name": name, "pipe": pipe, "build_seconds": time.perf_counter() - start,
                "times": [], "output": None, "peak": 0}

    def cached(self, entry: dict):
        return entry["pipe"].transformer.current

    def release(self, entry: dict) -> None:
        del entry["pipe"]

    def sampling_run(self, entry: dict):
        pipe = entry["pipe"]
        size = self.tokens_per_side * self.latent_pixels_per_token() * pipe.vae_scale_factor

        def call():
            torch.manual_seed(self.seed)  # ToCa's random scores and ClusCa's K-means draw from it
            return pipe(**self.prompts, num_images_per_prompt=self.batch, num_inference_steps=self.num_steps,
                        guidance_scale=self.cfg_scale, height=size, width=size,
                        generator=torch.Generator().manual_seed(self.seed), output_type="latent").images

        return call

    def summary(self, results: list[dict], model_name: str = "") -> dict:
        return {**super().summary(results, model_name), "text_tokens": self.text_tokens,
                "image_tokens": self.image_tokens}


class PixArtBenchSession(PipelineBenchSession):
    """PixArt-α in PixArtAlphaPipeline: DPM-Solver multistep, 20 steps, classifier-free guidance
    4.5 in one batch from random prompt and negative caption embeddings, 120 caption tokens, the
    config's sample size."""

    default_steps, default_guidance_scale, guides_in_batch = 20, PIXART_CFG_SCALE, True
    default_text_tokens = PIXART_TEXT_TOKENS
    scheduler = TEXT_PIPELINE_SCHEDULER

    def default_image_tokens(self) -> int:
        config = self.model.config
        return (config.sample_size // config.patch_size) ** 2

    def latent_pixels_per_token(self) -> int:
        return self.model.config.patch_size

    def prompt_arguments(self, generator: torch.Generator) -> dict:
        shape = (1, self.text_tokens, self.model.config.caption_channels)
        prompt, negative = (torch.randn(shape, generator=generator) for _ in range(2))
        mask = torch.ones(1, self.text_tokens)
        return dict(prompt=None, negative_prompt=None, prompt_embeds=prompt, prompt_attention_mask=mask,
                    negative_prompt_embeds=negative, negative_prompt_attention_mask=mask, use_resolution_binning=False)


class FluxBenchSession(PipelineBenchSession):
    """FLUX in FluxPipeline: flow-matching Euler with FLUX.1-dev's resolution-dependent shift, 28
    steps, guidance 3.5 through the guidance embedding (one batch, no negative prompt), random T5
    and pooled CLIP embeddings; 256 text tokens (FLUX.1-schnell's prompt length) and 1024 image
    tokens (512×512 pixels: a 64×64 latent packed in 2×2 patches) keep a CPU run affordable."""

    default_steps, default_guidance_scale, default_text_tokens, guides_in_batch = 28, 3.5, 256, False
    scheduler = FLOW_MATCHING_SCHEDULER

    def default_image_tokens(self) -> int:
        return 1024

    def latent_pixels_per_token(self) -> int:
        return 2  # FluxPipeline packs 2×2 latent pixels into a token

    def prompt_arguments(self, generator: torch.Generator) -> dict:
        config = self.model.config
        return dict(prompt=None, prompt_embeds=torch.randn(1, self.text_tokens, config.joint_attention_dim,
                                                           generator=generator),
                    pooled_prompt_embeds=torch.randn(1, config.pooled_projection_dim, generator=generator))


# diffusers transformer class -> the session that samples it in its pipeline
PIPELINE_SESSIONS = {"PixArtTransformer2DModel": PixArtBenchSession, "FluxTransformer2DModel": FluxBenchSession}


def pipeline_session(model) -> type[PipelineBenchSession]:
    """The PipelineBenchSession subclass that samples the text-conditioned `model`."""
    name = type(model).__name__
    if name not in PIPELINE_SESSIONS:
        raise GraphcacheError(f"bench samples PixArt-α and FLUX in their pipelines, not a {name}: run its pipeline "
                              "with graphcache.enable(pipe) by hand")
    return PIPELINE_SESSIONS[name]


def bench(model, methods, *, backend: str = "eager", compile_options: dict | None = None,
          hoist_conditioning: bool = True, num_steps: int | None = None, batch: int = 1, sampler: str | None = None,
          cfg_scale: float | None = 1.5, guidance: str | None = None, repeats: int = 3, warmup: int = 1,
          seed: int = 0, interleave: bool | None = None, model_name: str = "", progress: bool = False,
          text_tokens: int | None = None, image_tokens: int | None = None) -> dict:
    """Time and score each (method, options) against the uncached model on the same backend.

    A class-conditional DiT samples with graphcache's sampler (`sampler`, default ddim; `guidance`,
    default official; `num_steps`, default 50). A text-conditioned transformer (PixArt-α, FLUX)
    samples in its diffusers pipeline (`pipeline_session(model)`: the pipeline's scheduler,
    `cfg_scale` as its guidance scale, `text_tokens` random prompt tokens and `image_tokens` image
    tokens; None: that session's defaults); `sampler`, `guidance` and hoist_conditioning=False do
    not apply to it.

    `none` runs first (added if missing): every speedup and fidelity figure is relative to it,
    built with the same backend, compile options and `hoist_conditioning`.
    Each method runs `warmup` untimed then `repeats` timed sampling runs of the same seeds; the
    last run's samples are the ones scored. Backend "compile" compiles every method's variants,
    `none` included, with the same `compile_options`; compilation happens in the warm-up runs
    (with warmup=0 the first timed run includes it).

    interleave: build every method first, then run them in rounds (none, a, b, ..., none, a, b,
    ...), so that a machine whose speed drifts during the bench slows every method alike and the
    ratios stay fair. Default: on for eager and compile, whose variants share the model's
    weights; off for the exported backends, each of which holds its own copy of the weights (one
    method at a time is built, run and freed). Peak memory is per method on CUDA; on a CPU it is
    the process's peak so far, which interleaved runs share.
    """
    _check_counts(repeats, warmup)
    if interleave is None:
        interleave = backend in ("eager", "compile")
    from .diffusers_models import is_text_conditioned

    if is_text_conditioned(model):
        given = [f"{name}={value!r}" for name, value in (("sampler", sampler), ("guidance", guidance))
                 if value is not None] + ([] if hoist_conditioning else ["hoist_conditioning=False"])
        if given:
            raise GraphcacheError(f"{type(model).__name__} samples in its diffusers pipeline, with the pipeline's "
                                  f"scheduler and guidance: {', '.join(given)} does not apply")
        session = pipeline_session(model)(model, backend=backend, compile_options=compile_options,
                                          num_steps=num_steps, batch=batch, guidance_scale=cfg_scale, seed=seed,
                                          text_tokens=text_tokens, image_tokens=image_tokens, interleaved=interleave)
    else:
        given = [name for name, value in (("text_tokens", text_tokens), ("image_tokens", image_tokens))
                 if value is not None]
        if given:
            raise GraphcacheError(f"{given[0]} applies to text-conditioned models, not to a {type(model).__name__}")
        session = BenchSession(model, backend=backend, compile_options=compile_options,
                               hoist_conditioning=hoist_conditioning, num_steps=num_steps or 50, batch=batch,
                               sampler=sampler or "ddim", cfg_scale=cfg_scale, guidance=guidance or "official",
                               seed=seed, interleaved=interleave)
    methods = list(methods)
    if not any(m == "none" for m, _ in methods):
        methods.insert(0, ("none", {}))
    methods.sort(key=lambda mo: mo[0] != "none")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(methods) * (warmup + repeats), desc="bench", unit="run", file=sys.stderr)

    def run(entries, timed: bool) -> None:
        for entry in entries:
            seconds = session.run(entry, timed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{entry['name']} {seconds:.2f}s{'' if timed else ' (warm-up)'}")

    def measure(entries) -> None:
        for _ in range(warmup):
            run(entries, timed=False)
        for _ in range(repeats):
            run(entries, timed=True)

    if interleave:
        entries = [session.build(name, options) for name, options in methods]
        measure(entries)
        results = [session.report(entry, entries[0]) for entry in entries]
    else:
        results, base = [], None
        for name, options in methods:
            entry = session.build(name, options)
            measure([entry])
            base = base or entry
            results.append(session.report(entry, base))
            session.release(entry)
    if bar is not None:
        bar.close()
    return session.summary(results, model_name)


def format_table(report: dict) -> str:
    """A plain-text table of a bench report, one line per method."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = f"{'method (non-default options)':<28} {'s/run':>8} {'speedup':>8} {'FLOPs x':>8} {'realiz.':>8} {'PSNR':>7} {'SSIM':>6} {'relL2':>7} {'acc':>6} {'FD':>8}"
    lines = [head, "-" * len(head)]
    from .methods import get_method

    for r in report["results"]:
        defaults = {o.name: o.default for o in get_method(r["method"]).options}
        changed = {k: v for k, v in r["options"].items() if defaults.get(k) != v}
        label = r["method"] + ("" if not changed else " " + ",".join(f"{k}={v}" for k, v in changed.items()))
        lines.append(
            f"{label[:28]:<28} {r['seconds']:>8.3f} {r['speedup']:>8.2f} {r['flops_speedup']:>8.2f} "
            f"{r['realization']:>8.2f} {f(r['psnr'], '7.2f')} {f(r['ssim'], '6.3f')} {f(r['rel_l2'], '7.4f')} "
            f"{f(r['accuracy'], '6.2%')} {f(r['fd'], '8.2f')}"
        )
    return "\n".join(lines)


def plot(report: dict, out_dir) -> list:
    """Write the speed-quality frontier and one step x block heatmap per method; returns the paths."""
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise GraphcacheError("--plot needs matplotlib: pip install 'graphcache[plot]'") from None
    from .schedule import KINDS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    results = report["results"]
    quality_key = "fd" if all(r["fd"] is not None for r in results) else "rel_l2"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results:
        ax.scatter(r["speedup"], r[quality_key], s=40)
        ax.annotate(r["method"], (r["speedup"], r[quality_key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"wall-clock speedup over none ({report['backend']})")
    ax.set_ylabel({"fd": "Fréchet distance (classifier features, lower is better)",
                   "rel_l2": "relative L2 to uncached output (lower is better)"}[quality_key])
    ax.set_title(f"speed vs quality: {report['model']}, {report['steps']} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "frontier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    colors = ["#2b6cb0", "#a0aec0", "#ed8936", "#ffffff", "#48bb78"]  # full, reuse, partial, skip, forecast
    for i, r in enumerate(results):
        grid = [[KINDS.index(k) for k in step] for step in r["kinds"]]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colors), vmin=0, vmax=len(KINDS) - 1)
        ax.set_xlabel("block")
        ax.set_ylabel("sampling step (first at top)")
        ax.set_title(f"{r['method']}: what each step computed")
        handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="k") for c in colors]
        ax.legend(handles, KINDS, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = out_dir / f"kinds_{i:02d}_{r['method']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
