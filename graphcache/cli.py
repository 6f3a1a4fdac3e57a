"""The `graphcache` command line: optimize, sample, schedule, calibrate, methods, inspect, bench.

Every problem graphcache can explain is printed as one line, `graphcache: error: ...`, on stderr
with exit code 2 (bad arguments included). Set GRAPHCACHE_DEBUG=1 to see the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import traceback
import zlib
from pathlib import Path

from .diffusers_models import PIXART_CFG_SCALE
from .errors import GraphcacheError, exception_line, one_line
from .exporters import BACKENDS
from .io import atomic_write
from .models.builtin import DEFAULT_MODEL, available
from .schedule import index_ranges, run_lengths

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a tool killed by SIGPIPE
PROG = "graphcache"
_OUTPUT_SUFFIXES = (".pt", ".png")
_PIXEL_CHANNELS = (1, 3)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BUILTIN_CFG_SCALE = 1.5


class _UsageError(Exception):
    """Bad command-line input found by argparse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line
        hint = f" (see `{self.prog} --help`)"
        raise _UsageError(message + hint)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _labels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids like 1,2,3, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class id, like 1,2,3")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _options(args) -> dict:
    """--set key=value pairs as a dict of strings (the method's Option.parse coerces them)."""
    return dict(getattr(args, "set", None) or [])


def _compile_options(args, backend: str, recorded: dict | None = None) -> dict | None:
    """compile_options from --compile-mode (over `recorded`, an artifact's), or None."""
    mode = getattr(args, "compile_mode", None)
    if mode is None:
        return None
    if backend != "compile":
        raise GraphcacheError(f"--compile-mode {mode} needs --backend compile (the backend is {backend})")
    return {**(recorded or {}), "mode": mode}


def _format_options(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items()) or "(no options)"


def _rle(items, *, ones: bool = True) -> str:
    """Run-length summary: full×1 reuse×27 (ones=False writes a run of one as just the value)."""
    return " ".join(f"{'-' if a is None else a}" + (f"×{n}" if ones or n > 1 else "") for a, n in run_lengths(items))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# PNG output (no imaging dependency)
# ---------------------------------------------------------------------------------------------


def _png_bytes(pixels) -> bytes:
    """Encode a (H, W, C) uint8 numpy array, C in {1, 3}, as an 8-bit PNG."""
    h, w, c = pixels.shape
    color_type = {1: 0, 3: 2}[c]  # grayscale, RGB

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def _image_grid(images, pad: int = 2, fill: int = 128):
    """(n, C, H, W) values in [-1, 1] -> one (rows*H', cols*W', C) uint8 grid, near-square."""
    import numpy as np
    import torch

    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # n, H, W, C
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def _check_output(path: Path, in_channels: int | None) -> None:
    suffix = path.suffix.lower()
    if suffix not in _OUTPUT_SUFFIXES:
        raise GraphcacheError(f"cannot write {path}: use a .pt (tensor) or .png (image grid) file name")
    if suffix == ".png" and in_channels is not None and in_channels not in _PIXEL_CHANNELS:
        raise GraphcacheError(
            f"cannot write {path}: this model samples {in_channels}-channel latents, not pixels; "
            "save them with -o FILE.pt (decoding latents needs the model's VAE)"
        )


def _write_output(x, path: Path) -> None:
    import torch

    if path.suffix.lower() == ".png":
        data = _png_bytes(_image_grid(x))
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    else:
        atomic_write(path, lambda tmp: torch.save(x.detach().cpu().contiguous(), tmp))


# ---------------------------------------------------------------------------------------------
# Loading models and artifacts
# ---------------------------------------------------------------------------------------------


def _load_model(spec: str, args):
    """A DiT from builtin:NAME, a checkpoint path, an artifact directory's weights, or the
    transformer of a diffusers model or pipeline folder."""
    from .artifact import is_artifact, load_artifact_model
    from .diffusers_models import load_transformer
    from .models.builtin import resolve_model

    allow_pickle = getattr(args, "allow_pickle", False)
    if is_artifact(spec):
        return load_artifact_model(spec)
    if Path(spec).is_dir():  # not an artifact: a diffusers folder, or an error naming what it lacks
        return load_transformer(spec, allow_pickle=allow_pickle)
    return resolve_model(spec, allow_pickle=allow_pickle, num_heads=getattr(args, "num_heads", None))


def _capture_kwargs(model, args) -> dict | None:
    """Example inputs for a diffusers transformer (the built-in DiT derives its own: None)."""
    from .diffusers_models import TRANSFORMERS, example_kwargs

    if type(model).__name__ not in TRANSFORMERS:
        return None
    tokens = getattr(args, "text_tokens", None)
    return example_kwargs(model) if tokens is None else example_kwargs(model, tokens)


def _open(args, *, default_method: str = "none"):
    """The CachedModel to run for `sample` / `inspect`: an artifact as saved, or MODEL optimized
    with --method/--set/--steps."""
    import graphcache

    from .artifact import is_artifact, load_artifact, read_manifest
    from .methods import get_method

    spec = args.model
    given = _options(args)
    if is_artifact(spec):
        manifest = read_manifest(spec)
        made = manifest["method"]
        if args.method is not None and args.method != made:
            raise GraphcacheError(
                f"{spec} is an artifact optimized with method {made}; --method {args.method} conflicts "
                "(run `graphcache optimize` again, or pass the model instead of the artifact)"
            )
        if args.steps is not None and args.steps != manifest["num_steps"]:
            raise GraphcacheError(
                f"{spec} is an artifact optimized for {manifest['num_steps']} steps; --steps {args.steps} "
                "conflicts (run `graphcache optimize` again with --steps)"
            )
        if given:
            wanted = get_method(made).resolve_options(given)
            for key in given:
                if wanted[key] != manifest["options"].get(key):
                    raise GraphcacheError(
                        f"{spec} is an artifact optimized with {key}={manifest['options'].get(key)}; "
                        f"--set {key}={given[key]} conflicts (run `graphcache optimize` again)"
                    )
        backend = getattr(args, "backend", None)
        recorded = manifest.get("compile_options") if manifest.get("backend") == "compile" else None
        options = _compile_options(args, backend or manifest.get("backend", "eager"), recorded)
        return load_artifact(spec, backend=backend, compile_options=options)
    method = get_method(args.method or default_method)
    method.resolve_options(given)  # fail on a bad option before loading anything
    backend = getattr(args, "backend", None) or "eager"
    options = _compile_options(args, backend)
    model = _load_model(spec, args)
    return graphcache.optimize(model, method.name, args.steps or 50, backend=backend, compile_options=options,
                               hoist_conditioning=getattr(args, "hoist_conditioning", True),
                               kwargs=_capture_kwargs(model, args), **given)


def _cache_bytes(cached) -> int:
    """Bytes the cache slots take at the capture batch size (2: one image with guidance)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in cached.slot_specs().values())


def _variant_lines(cached) -> list[str]:
    lines = []
    for key in cached.schedule.variants():
        plan = next(p for p in cached.schedule.steps if p.variant == key)
        steps = [p.index for p in cached.schedule.steps if p.variant == key]
        lines.append(f"{_rle(plan.kinds)}: {len(steps)} step{'s' * (len(steps) != 1)}")
    return lines


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_optimize(args) -> int:
    import graphcache

    from .artifact import is_artifact, read_manifest, save_artifact
    from .methods import get_method

    given = _options(args)
    method = get_method(args.method)
    method.resolve_options(given)
    compile_options = _compile_options(args, args.backend)
    out = Path(args.output)
    source = args.model
    if is_artifact(source):
        source = read_manifest(source)["model"].get("source", source)
    model = _load_model(args.model, args)
    cached = graphcache.optimize(model, method.name, args.steps, backend=args.backend,
                                 compile_options=compile_options, hoist_conditioning=args.hoist_conditioning,
                                 kwargs=_capture_kwargs(model, args), **given)
    save_artifact(cached, out, model_spec=source)
    variants = _variant_lines(cached)
    print(f"optimized {args.model} with {method.name} ({_format_options(cached.options)}) "
          f"for {cached.num_steps} steps")
    print(f"  variants: {len(variants)} ({'; '.join(variants)})")
    print(f"  cache: {_human_bytes(_cache_bytes(cached))} for a batch of 2 (one image with guidance)")
    if cached.backend == "compile":
        mode = cached.compile_options.get("mode") or "default"
        print(f"  backend: compile (torch.compile, {cached.compile_options['backend']}, mode {mode}; "
              "each variant compiles once, on its first call)")
    if getattr(cached, "exported", None):
        print(f"  backend: {cached.backend} ({len(cached.exported)} exported variants)")
    files = sorted(p.name + "/" * p.is_dir() for p in out.iterdir() if p.name != "manifest.json")
    print(f"  wrote {out}/ (manifest.json, {', '.join(files)})")
    return 0


def cmd_sample(args) -> int:
    import graphcache

    from .diffusers_models import is_diffusers_folder, is_pipeline_folder

    out = Path(args.output)
    _check_output(out, None)  # the suffix, before loading anything
    if is_pipeline_folder(args.model):
        return _sample_pipeline(args, out)
    if is_diffusers_folder(args.model):
        raise GraphcacheError(f"{args.model} is a diffusers model folder: it has no VAE or scheduler to sample with; "
                              "sample from the pipeline folder `pipe.save_pretrained(DIR)` writes")
    _refuse_pipeline_options(args, "a pipeline folder")
    _refuse_diffusers_artifact(args.model)
    if args.labels is None:
        raise GraphcacheError("--labels is required (class ids, one image each)")
    noise = None
    if args.noise is not None:
        noise = _load_noise(Path(args.noise))
    cached = _open(args)
    _check_output(out, int(cached.in_channels))
    if noise is not None:
        noise = noise.to(cached.input_dtype)
    start = time.perf_counter()
    cfg_scale = _BUILTIN_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    x = graphcache.sample(cached, args.labels, noise=noise, seed=args.seed, num_steps=cached.num_steps,
                          sampler=args.sampler, cfg_scale=cfg_scale, guidance=args.guidance, progress=not args.quiet)
    seconds = time.perf_counter() - start
    _write_output(x, out)
    if not args.quiet:
        dtype = str(x.dtype).replace("torch.", "")
        print(f"wrote {out}: {tuple(x.shape)} {dtype} ({cached.method.name} {_format_options(cached.options)}, "
              f"{args.sampler} {cached.num_steps} steps, {seconds:.1f} s)")
    return 0


def _refuse_diffusers_artifact(spec: str) -> None:
    """graphcache's sampler calls class-conditional DiTs; a diffusers transformer samples in its pipeline."""
    from .artifact import is_artifact, read_manifest

    made_from = read_manifest(spec)["model"].get("diffusers_class") if is_artifact(spec) else None
    if made_from is not None:
        raise GraphcacheError(f"{spec} holds a diffusers {made_from}: sample from its pipeline folder "
                              "(`graphcache sample PIPELINE_DIR --method M`), which caches it the same way")


def _refuse_pipeline_options(args, needs: str) -> None:
    for flag, value in (("--prompt-embeds", args.prompt_embeds), ("--negative-embeds", args.negative_embeds)):
        if value is not None:
            raise GraphcacheError(f"{flag} needs {needs}")


def _sample_pipeline(args, out: Path) -> int:
    """Sample from a diffusers pipeline folder with graphcache.enable: class labels for DiT,
    saved prompt embeddings for PixArt-α (the folder's text encoder is never loaded)."""
    import torch

    import graphcache

    from .diffusers_models import load_pipeline

    if args.noise is not None:
        raise GraphcacheError("--noise applies to graphcache's own sampler; a pipeline draws its noise from --seed")
    method = args.method or "none"
    backend = args.backend or "eager"
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    name = type(pipe).__name__
    if name not in ("DiTPipeline", "PixArtAlphaPipeline"):
        raise GraphcacheError(f"{args.model}: graphcache sample runs DiT and PixArt-α pipeline folders; run a "
                              f"{name} in Python: graphcache.enable(load_pipeline(DIR)) and call it with prompt "
                              "embeddings")
    if name == "PixArtAlphaPipeline":
        call = _pixart_call(args, pipe)
    else:
        _refuse_pipeline_options(args, "a PixArt-α pipeline folder")
        if args.labels is None:
            raise GraphcacheError(f"{args.model} is a DiT pipeline: --labels is required (class ids, one image each)")
        call = dict(class_labels=args.labels)
        if args.cfg_scale is not None:
            call["guidance_scale"] = args.cfg_scale
    graphcache.enable(pipe, method, backend=backend, compile_options=_compile_options(args, backend),
                      **_options(args))
    pipe.set_progress_bar_config(disable=args.quiet)
    steps = args.steps or 50
    torch.manual_seed(args.seed)  # ToCa's random scores and ClusCa's K-means draw from the global generator
    start = time.perf_counter()
    images = pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(args.seed),
                  output_type="np").images
    seconds = time.perf_counter() - start
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # (n, H, W, C) in [0, 1] -> (n, C, H, W) in [-1, 1]
    _write_output(x, out)
    if not args.quiet:
        options = pipe.transformer.current.options  # the method's options, defaults resolved
        print(f"wrote {out}: {tuple(x.shape)} ({type(pipe).__name__}, {method} {_format_options(options)}, "
              f"{steps} steps, {seconds:.1f} s)")
    return 0


def _pixart_call(args, pipe) -> dict:
    """The PixArt-α pipeline arguments for saved embeddings, at the transformer's own resolution."""
    if args.labels is not None:
        raise GraphcacheError(f"{args.model} is a text-conditioned pipeline: pass --prompt-embeds, not --labels")
    if args.prompt_embeds is None:
        raise GraphcacheError(f"{args.model} is a text-conditioned pipeline: --prompt-embeds FILE is required "
                              "(a safetensors file holding prompt_embeds and optionally prompt_attention_mask)")
    channels = pipe.transformer.config.caption_channels
    embeds, mask = _load_embeddings(Path(args.prompt_embeds), channels)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    call = dict(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, height=size,
                width=size, use_resolution_binning=False)
    if args.negative_embeds is not None:
        embeds, mask = _load_embeddings(Path(args.negative_embeds), channels)
        call.update(negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask,
                    guidance_scale=PIXART_CFG_SCALE if args.cfg_scale is None else args.cfg_scale)
    elif args.cfg_scale is not None and args.cfg_scale > 1:
        raise GraphcacheError("--cfg-scale above 1 needs --negative-embeds (the unconditional embeddings)")
    else:
        call["guidance_scale"] = 1.0  # no negative embeddings: no guidance
    return call


def _load_embeddings(path: Path, channels: int):
    """prompt_embeds (n, L, channels) and prompt_attention_mask (n, L) (all ones when absent) from
    a safetensors file."""
    import torch

    from .io import load_state_dict_file

    if path.suffix.lower() != ".safetensors":
        raise GraphcacheError(f"{path}: embeddings must be a .safetensors file")
    tensors = load_state_dict_file(path)
    embeds = tensors.get("prompt_embeds")
    if embeds is None or embeds.ndim != 3 or embeds.shape[2] != channels:
        found = "no prompt_embeds" if embeds is None else f"prompt_embeds of shape {list(embeds.shape)}"
        raise GraphcacheError(f"{path}: expected prompt_embeds (n, L, {channels}), found {found}")
    mask = tensors.get("prompt_attention_mask", torch.ones(embeds.shape[:2]))
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise GraphcacheError(f"{path}: prompt_attention_mask has shape {list(mask.shape)}, "
                              f"expected {list(embeds.shape[:2])}")
    return embeds, mask  # the pipeline casts them to the transformer's dtype


def _load_noise(path: Path):
    import torch

    if not path.exists():
        raise GraphcacheError(f"noise file not found: {path}")
    if not path.is_file():
        raise GraphcacheError(f"noise path is not a file: {path}")
    try:
        noise = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GraphcacheError(f"{path}: not a readable tensor file: {exception_line(e)}") from e
    if not isinstance(noise, torch.Tensor):
        raise GraphcacheError(f"{path}: expected one tensor (n, C, H, W), found a {type(noise).__name__}")
    if not noise.dtype.is_floating_point:
        raise GraphcacheError(f"{path}: noise must be a floating-point tensor, found {noise.dtype}")
    return noise


def cmd_schedule(args) -> int:
    from . import ir
    from .methods import get_method

    method = get_method(args.method)
    model = structure = None
    if args.model is not None:
        import graphcache

        if args.tokens is not None:
            raise GraphcacheError("--tokens conflicts with --model (the model gives the token count)")
        model = _load_model(args.model, args)
        structure = ir.structure_of(graphcache.capture(model, kwargs=_capture_kwargs(model, args)))
        depth, tokens = structure.depth, structure.num_tokens
    elif _options(args).get("eoc"):  # without a model, the prior says what it was calibrated on
        from .eoc import load_prior

        meta = load_prior(_options(args)["eoc"]).meta
        depth = args.depth if args.depth is not None else 1 + max(meta["branches"].values())
        tokens = args.tokens if args.tokens is not None else meta["num_tokens"]
    else:
        depth = args.depth if args.depth is not None else 28
        tokens = args.tokens if args.tokens is not None else 256
    schedule = method.schedule(args.steps, depth, _options(args), tokens, structure)
    if args.json:
        obj = schedule.to_json()
        from .flops import flops_json

        try:
            obj["flops"] = flops_json(schedule, model, getattr(args, "text_tokens", None))
        except GraphcacheError as e:  # a model the papers' accounting does not cover: say so, count nothing
            obj["flops"], obj["flops_unavailable"] = None, str(e)
        _print_json(obj)
        return 0
    variants = schedule.variants()
    counts = run_lengths(sorted(_rle(p.kinds) for p in schedule.steps))
    print(f"{method.name} {_format_options(schedule.options)}: {schedule.num_steps} steps, depth {depth}, "
          f"{tokens} tokens, {len(variants)} variant{'s' * (len(variants) != 1)}")
    print("  " + "; ".join(f"{kinds}: {n} step{'s' * (n != 1)}" for kinds, n in counts))
    print(f"{'index':>5} {'step':>5}  kinds")
    for p in schedule.steps:
        line = f"{p.index:>5} {p.step:>5}  {_rle(p.kinds)}"
        if p.tokens is not None:
            line += f"  tokens {_rle(p.tokens, ones=False)}"
        if p.cross_tokens is not None:
            line += f"  cross-attention tokens {_rle(p.cross_tokens, ones=False)}"
        if p.corrected:
            line += f"  eoc corrects {', '.join(p.corrected)}"
        print(line)
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .diffusers_models import is_diffusers_folder, is_pipeline_folder
    from .eoc import step_weights

    out = Path(args.output)
    if out.suffix.lower() != ".safetensors":
        raise GraphcacheError(f"cannot write the prior to {out}: use a .safetensors file name")
    if _options(args) and args.for_method is None:
        raise GraphcacheError("--set gives options of the --for method: add --for METHOD")
    if is_pipeline_folder(args.model):
        prior = _calibrate_pipeline(args)
    else:
        if is_diffusers_folder(args.model):
            raise GraphcacheError(f"{args.model} is a diffusers model folder: calibrate from the pipeline folder "
                                  "`pipe.save_pretrained(DIR)` writes (its scheduler and guidance sample it)")
        _refuse_pipeline_options(args, "a PixArt-α pipeline folder")
        model = _load_model(args.model, args)
        for attr in ("num_classes", "in_channels", "input_size"):
            if not hasattr(model, attr):
                raise GraphcacheError(f"{args.model} is not a class-conditional DiT (no `{attr}`): calibrate "
                                      "samples it with graphcache's class-conditional sampler")
        prior = calibrate(model, args.steps, samples=args.samples, held_out=args.held_out, batch=args.batch,
                          sampler=args.sampler or "ddim",
                          cfg_scale=_BUILTIN_CFG_SCALE if args.cfg_scale is None else args.cfg_scale,
                          for_method=args.for_method, method_options=_options(args), progress=not args.quiet)
    prior.save(out)
    m = prior.meta
    kept = sum(w != 0 for br in prior.trend for w in step_weights(prior, br, 0.01, "held-out").values())
    total = len(prior.trend) * len(prior.steps)
    print(f"calibrated {args.model}: {m['samples']} samples (+{m['held_out']} held out), {m['sampler']} "
          f"{m['num_steps']} steps, cfg {m['cfg_scale']}, {len(prior.trend)} branches, {m['num_tokens']} tokens")
    if args.for_method is not None:
        print(f"  for {args.for_method} {_format_options(_options(args))}: keeps steps {index_ranges(prior.steps)} "
              f"({len(prior.steps)} of {m['num_steps'] - 1})")
    print(f"  judgment at eoc_lambda=0.01: {kept} of {total} (step, branch) corrections lower the held-out error")
    print(f"  wrote {out} ({_human_bytes(out.stat().st_size)}); use it with --set eoc={out}")
    return 0


def _calibrate_pipeline(args):
    """EOC's prior from a DiT pipeline folder (class labels) or a PixArt-α one (--prompt-embeds,
    each prompt one sample), sampled with the folder's scheduler and guidance."""
    from .calibration import calibrate_pipeline
    from .diffusers_models import load_pipeline

    if args.sampler is not None:
        raise GraphcacheError("--sampler applies to graphcache's own sampler; a pipeline folder samples with its "
                              "scheduler")
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)  # calibration shows one bar of its own
    prompts = None
    if type(pipe).__name__ == "PixArtAlphaPipeline":
        if args.prompt_embeds is None:
            raise GraphcacheError(f"{args.model} is a text-conditioned pipeline: --prompt-embeds FILE is required "
                                  "(each prompt is one calibration sample)")
        channels = pipe.transformer.config.caption_channels
        embeds, mask = _load_embeddings(Path(args.prompt_embeds), channels)
        prompts = dict(prompt_embeds=embeds, prompt_attention_mask=mask)
        if args.negative_embeds is not None:
            embeds, mask = _load_embeddings(Path(args.negative_embeds), channels)
            prompts.update(negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask)
    else:
        _refuse_pipeline_options(args, "a PixArt-α pipeline folder")
    return calibrate_pipeline(pipe, args.steps, samples=args.samples, held_out=args.held_out, batch=args.batch,
                              cfg_scale=args.cfg_scale, prompts=prompts, for_method=args.for_method,
                              method_options=_options(args), progress=not args.quiet)


def cmd_methods(args) -> int:
    from .methods import METHODS

    if args.json:
        _print_json({"methods": [
            {
                "name": m.name,
                "summary": m.summary,
                "options": [
                    {"name": o.name, "default": o.default, "type": o.type.__name__, "help": o.help,
                     "choices": list(o.choices) if o.choices else None,
                     "minimum": o.minimum, "maximum": o.maximum}
                    for o in m.options
                ],
            }
            for m in METHODS.values()
        ]})
        return 0
    width = max(len(name) for name in METHODS)
    for m in METHODS.values():
        print(f"{m.name:<{width}}  {m.summary}")
        for o in m.options:
            extra = f", one of {'/'.join(map(str, o.choices))}" if o.choices else ""
            if o.minimum is not None:
                extra += f", >= {o.minimum}"
            if o.maximum is not None:
                extra += f", <= {o.maximum}"
            print(f"{'':<{width}}    --set {o.name}={o.default}  ({o.type.__name__}{extra}) {o.help}")
    return 0


def cmd_inspect(args) -> int:
    cached = _open(args)
    if not hasattr(cached, "describe"):
        raise GraphcacheError(f"{args.model} is a {cached.backend} artifact: it holds exported graphs, not the model "
                              "to inspect (inspect the model it was made from)")
    info = cached.describe()
    if args.json:
        info = {"model": args.model, **info}
        _print_json(info)
        return 0
    structure = cached.structure
    print(f"model: {args.model} ({type(cached.model).__name__}: {structure.depth} blocks, "
          f"{structure.num_tokens} tokens, hidden {structure.hidden_size})")
    print(f"method: {info['method']} {_format_options(info['options'])}, {info['num_steps']} steps; "
          f"captured graph: {info['captured_nodes']} nodes")
    print("streams: " + ", ".join(f"{st['name']} ({st['tokens']} tokens, {st['start']} -> {st['end']})"
                                  for st in info["streams"]))
    for line in info["unclassified"]:
        print(f"not classified: {line}")
    multi = len({st["name"] for st in info["streams"]}) > 1
    print("blocks:")
    for b in info["blocks"]:
        print(f"  block {b['block']}  {b['module'] or '(top level)'}")
        for br in b["branches"]:
            gate = f"gate {br['gate']}" if br["gate"] else "no gate"
            kind = f"{br['stream']} {br['kind']}" if multi else br["kind"]
            print(f"    {kind:<21} {br['module'] or '(inline)':<28} cut at {br['branch_out']}, {gate}, "
                  f"{br['work_nodes']} work nodes")
    print("variants:")
    for v in info["variants"]:
        print(f"  {v['kinds']}  steps {index_ranges(v['steps'])} ({len(v['steps'])}), {v['nodes']} nodes")
        if not v["passes"]:
            print("    (no passes: the captured graph as it is)")
        for p in v["passes"]:
            _print_pass(p, "    ")
        if v["runner_passes"]:
            print(f"    {info['backend']} runner:")
            for p in v["runner_passes"]:
                _print_pass(p, "      ")
    return 0


def _print_pass(record: dict, indent: str) -> None:
    counters = ", ".join(f"{k}={n}" for k, n in record["counters"].items() if n) or "no change"
    print(f"{indent}{record['pass']}: {counters}")
    for d in record["declined"]:
        print(f"{indent}  declined {d}")


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

_MAIN_EPILOG = f"""\
examples:
  graphcache methods
  graphcache sample {DEFAULT_MODEL} --method fora --labels 1,2 -o samples.pt
  graphcache optimize DiT-XL-2-256x256.pt --method fora --set interval=3 -o dit-fora/
  graphcache sample dit-fora/ --labels 207,360 -o latents.pt
  graphcache schedule --method fora --steps 50 --json
  graphcache inspect {DEFAULT_MODEL} --method fora
  graphcache calibrate {DEFAULT_MODEL} --method eoc --steps 20 -o prior.safetensors
  graphcache sample {DEFAULT_MODEL} --method fora --steps 20 --set level=50 --set eoc=prior.safetensors --labels 1,2 -o out.png
  graphcache sample pixart-alpha/ --prompt-embeds prompt.safetensors --method fora --steps 20 -o image.png

MODEL is a checkpoint file (.pt/.pth/.safetensors, loaded with weights_only), a diffusers model or
pipeline folder (DiT, PixArt-α: config.json / model_index.json + safetensors; needs
graphcache[diffusers]) or a built-in:
{chr(10).join(f'  {m.spec:<24} {m.summary}' for m in available())}
Set GRAPHCACHE_DEBUG=1 to see tracebacks."""


def _add_model_loading(p) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that contain pickled Python objects (runs code from the file: "
                        "only for files you trust)")
    p.add_argument("--num-heads", type=_positive_int, metavar="H",
                   help="attention heads, when they cannot be inferred from the checkpoint")
    p.add_argument("--text-tokens", type=_positive_int, metavar="L",
                   help="text-conditioned diffusers models: prompt length to capture with (default: the released "
                        "model's, PixArt-α 120, FLUX 512; bench on FLUX: 256; another length at run time captures "
                        "again)")


def _add_backend(p, *, default: str | None = "eager", default_note: str = "eager") -> None:
    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help=f"eager: run the variants as Python graphs; compile: each variant under "
                        f"torch.compile(fullgraph=True), compiled once on its first call; aoti / onnx: each "
                        f"variant exported ahead of time (AOTInductor .pt2 / ONNX run by onnxruntime; with -o the "
                        f"artifact runs without the model's code); tensorrt: engines from the ONNX files "
                        f"(needs TensorRT) (default: {default_note})")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="torch.compile mode for --backend compile: " + ", ".join(COMPILE_MODES)
                        + " (default: torch's default); reduce-overhead records CUDA graphs and only helps on CUDA")
    p.add_argument("--no-hoist-conditioning", dest="hoist_conditioning", action="store_false",
                   help="eager/compile: compute the adaLN modulation at every step, with the plain model's "
                        "arithmetic bit for bit, instead of once per run for all steps (one batched GEMM per "
                        "block, faster, equal to float rounding)")


def _add_method(p, *, required: bool, default_note: str = "") -> None:
    p.add_argument("--method", required=required, metavar="M",
                   help=f"caching method (see `graphcache methods`){default_note}")
    _add_set(p, "a method option, e.g. --set interval=3 (repeatable)")


def _add_set(p, help: str) -> None:
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE", default=[], help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="Compile feature caching into Diffusion Transformers by rewriting their "
                                 "torch.fx graphs.",
                     epilog=_MAIN_EPILOG)
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"graphcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # optimize
    p = sub.add_parser(
        "optimize", formatter_class=_Formatter, help="optimize a model and write an artifact directory",
        description="Capture MODEL, build the method's variants, and write an artifact directory OUT that "
                    "`graphcache sample` runs: manifest.json + model.safetensors (eager, compile), or "
                    "manifest.json + one exported file per variant (aoti, onnx, tensorrt), which run without "
                    "the model's code. Writing is atomic: a failure leaves no OUT.",
        epilog=f"examples:\n  graphcache optimize {DEFAULT_MODEL} --method fora -o dit-fora/\n"
               "  graphcache optimize DiT-XL-2-256x256.pt --method fora --set interval=4 --steps 50 -o out/\n"
               f"  graphcache optimize {DEFAULT_MODEL} --method toca --backend onnx -o dit-toca-onnx/\n"
               f"  graphcache optimize {DEFAULT_MODEL} --method clusca --backend aoti -o dit-clusca-aoti/\n"
               "  graphcache optimize pixart-alpha/ --method toca --steps 20 -o pixart-toca/   (a diffusers folder)",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"checkpoint file, diffusers model or pipeline folder, or builtin:NAME "
                        f"(default: {DEFAULT_MODEL})")
    _add_method(p, required=True)
    p.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="sampling steps (default: 50)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    _add_backend(p)
    _add_model_loading(p)
    p.set_defaults(func=cmd_optimize)

    # sample
    from .sampling import GUIDANCE_MODES, SAMPLERS

    p = sub.add_parser(
        "sample", formatter_class=_Formatter, help="sample images/latents from a model or an artifact",
        description="Sample class-conditional outputs. MODEL_OR_ARTIFACT is an artifact directory written by "
                    "`graphcache optimize` (its method and steps are used) or a model, optimized here with "
                    "--method (default: none, no caching). A diffusers pipeline folder (DiT with --labels, "
                    "PixArt-α with --prompt-embeds) runs with graphcache.enable and its own scheduler and VAE.",
        epilog=f"examples:\n  graphcache sample {DEFAULT_MODEL} --method fora --labels 1,2 -o samples.pt\n"
               "  graphcache sample dit-fora/ --labels 207,360 --seed 1 -o latents.pt\n"
               "  graphcache sample mnist.safetensors --labels 0,1,2,3 -o digits.png   (pixel-space models)\n"
               "  graphcache sample dit-fora/ --labels 1,2 --noise noise.pt -o out.pt\n"
               "  graphcache sample dit-toca-onnx/ --labels 1,2,3 -o out.pt   (exported: any batch of 2+ rows: 1+ images with guidance)\n"
               f"  graphcache sample {DEFAULT_MODEL} --method toca --labels 1,2 --backend compile -o samples.pt\n"
               "  graphcache sample dit-pipeline/ --labels 207,360 --method fora --steps 50 -o images.png\n"
               "  graphcache sample pixart-alpha/ --prompt-embeds p.safetensors --negative-embeds n.safetensors "
               "--method toca --steps 20 -o image.png",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL_OR_ARTIFACT",
                   help=f"artifact directory, checkpoint file, builtin:NAME or diffusers pipeline folder "
                        f"(default: {DEFAULT_MODEL})")
    _add_method(p, required=False, default_note=" (default: none; an artifact's own method)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="sampling steps (default: 50, or the artifact's)")
    p.add_argument("--labels", type=_labels, metavar="1,2,3",
                   help="class ids, one image each (class-conditional models and DiT pipelines)")
    p.add_argument("--prompt-embeds", metavar="FILE",
                   help="PixArt-α pipeline folders: a .safetensors file holding prompt_embeds (n, L, C) and "
                        "optionally prompt_attention_mask (n, L); one image per row")
    p.add_argument("--negative-embeds", metavar="FILE",
                   help="PixArt-α: the unconditional embeddings, same format; without them there is no guidance")
    p.add_argument("--seed", type=int, default=0, help="global torch seed (default: 0)")
    p.add_argument("--noise", metavar="FILE.pt",
                   help="initial noise (n, C, H, W) saved with torch.save (not for pipeline folders)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="default: ddim (pipeline folders use their own scheduler)")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help=f"classifier-free guidance scale; <= 1 disables guidance (default: {_BUILTIN_CFG_SCALE}; "
                        f"pipelines: DiT's 4.0, PixArt-α's {PIXART_CFG_SCALE})")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="official",
                   help="official: the reference's 3-channel guidance; eps: all channels (default: official)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help=".pt: the (n, C, H, W) tensor; .png: an image grid (pixel-space models and pipelines, "
                        "which decode with their VAE)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    _add_backend(p, default=None, default_note="the artifact's, else eager")
    _add_model_loading(p)
    p.set_defaults(func=cmd_sample)

    # schedule
    p = sub.add_parser(
        "schedule", formatter_class=_Formatter, help="print a method's per-step plan",
        description="Print what kind every block is at each sampling step (and token counts where a method "
                    "computes some tokens). Depth and tokens default to DiT-XL/2 at 256px (28, 256).",
        epilog="examples:\n  graphcache schedule --method fora --steps 50\n"
               "  graphcache schedule --method fora --set interval=4 --depth 12 --json\n"
               f"  graphcache schedule --method fora --model {DEFAULT_MODEL}",
    )
    _add_method(p, required=True)
    p.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="sampling steps (default: 50)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="MODEL",
                       help="take depth and token count (and --json's FLOPs) from this model, a diffusers folder too")
    where.add_argument("--depth", type=_positive_int, metavar="D", help="number of blocks (default: 28)")
    p.add_argument("--tokens", type=_positive_int, metavar="T", help="tokens per image (default: 256)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_model_loading(p)
    p.set_defaults(func=cmd_schedule)

    # calibrate
    p = sub.add_parser(
        "calibrate", formatter_class=_Formatter, help="extract EOC's prior from uncached runs",
        description="Sample MODEL uncached and record every branch's ungated output per step (from the "
                    "captured graph): their average over the calibration samples gives EOC's prior trends, "
                    "held-out samples (other seeds) the statistics its judgment and fitted λ read. The prior "
                    "serves one model, sampler, step count and resolution; a DiT or PixArt-α pipeline folder "
                    "is sampled by its own scheduler and guidance, from class labels or --prompt-embeds. Use the "
                    "prior with any method that has the eoc option (`--set eoc=PRIOR`). Calibration seeds start at 1000, held-out seeds at "
                    "2000. With --for METHOD the prior keeps only the steps that method's schedule reads, and "
                    "serves that schedule alone. Writing is atomic.",
        epilog=f"examples:\n  graphcache calibrate {DEFAULT_MODEL} --method eoc --steps 20 -o prior.safetensors\n"
               f"  graphcache calibrate {DEFAULT_MODEL} --method eoc --steps 20 --for fora --set level=50 "
               "-o fora50.safetensors\n"
               f"  graphcache sample {DEFAULT_MODEL} --method fora --steps 20 --set level=50 "
               "--set eoc=prior.safetensors --labels 1,2 -o out.png\n"
               "  graphcache calibrate dit-pipeline/ --method eoc --steps 20 --samples 64 -o dit.safetensors\n"
               "  graphcache calibrate pixart-alpha/ --method eoc --steps 20 --prompt-embeds prompts.safetensors "
               "--negative-embeds n.safetensors --held-out 8 -o pixart.safetensors\n"
               "  graphcache sample pixart-alpha/ --prompt-embeds p.safetensors --negative-embeds n.safetensors "
               "--method fora --steps 20 --set eoc=pixart.safetensors -o image.png",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"checkpoint file, builtin:NAME, or a DiT or PixArt-α pipeline folder (default: "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--method", required=True, choices=("eoc",), help="what to calibrate: eoc")
    p.add_argument("--steps", type=_positive_int, required=True, metavar="N", help="sampling steps the prior serves")
    p.add_argument("--samples", type=_positive_int, default=None, metavar="M",
                   help="calibration samples, classes in turn (default: one per class); PixArt-α: the first M "
                        "prompts (default: the first half, rounded up)")
    p.add_argument("--held-out", type=_positive_int, default=None, metavar="H",
                   help="held-out samples for the judgment (default: as many as --samples); PixArt-α: the H "
                        "prompts after them (default: the rest)")
    p.add_argument("--batch", type=_positive_int, default=16, metavar="B", help="samples per run (default: 16)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: ddim (pipeline folders use their own scheduler)")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help=f"guidance scale (default: {_BUILTIN_CFG_SCALE}; pipelines: DiT's 4.0, PixArt-α's "
                        f"{PIXART_CFG_SCALE} with --negative-embeds, none without)")
    p.add_argument("--prompt-embeds", metavar="FILE",
                   help="PixArt-α pipeline folders: the calibration prompts, a .safetensors file holding "
                        "prompt_embeds (n, L, C) and optionally prompt_attention_mask (n, L); one sample per row")
    p.add_argument("--negative-embeds", metavar="FILE",
                   help="PixArt-α: the unconditional embeddings (one row, or one per prompt); without them there "
                        "is no guidance")
    p.add_argument("--for", dest="for_method", metavar="M",
                   help="keep only the steps this caching method's schedule (with --set) reads: the small "
                        "form; without --for the prior keeps every step, the large form (DiT-XL/2, 20 steps: "
                        "1.3 GB)")
    _add_set(p, "an option of the --for method, e.g. --set level=50 (repeatable; EOC's own are given "
                "where the prior is used)")
    p.add_argument("-o", "--output", required=True, metavar="PRIOR", help=".safetensors file to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_loading(p)
    p.set_defaults(func=cmd_calibrate)

    # methods
    p = sub.add_parser(
        "methods", formatter_class=_Formatter, help="list the caching methods and their options",
        description="List every caching method with its summary and options (name, default, help).",
        epilog="examples:\n  graphcache methods\n  graphcache methods --json",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_methods)

    # inspect
    p = sub.add_parser(
        "inspect", formatter_class=_Formatter, help="show the blocks capture found and what each pass did",
        description="Capture MODEL (or open an artifact), print the blocks and branches it found (with the cut "
                    "point each method caches), then per variant what every pass inserted or declined.",
        epilog=f"examples:\n  graphcache inspect {DEFAULT_MODEL}\n"
               f"  graphcache inspect {DEFAULT_MODEL} --method fora --steps 10\n"
               "  graphcache inspect dit-fora/ --json\n"
               "  graphcache inspect pixart-alpha/ --method toca --text-tokens 120",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"artifact directory, checkpoint file, diffusers model or pipeline folder, or builtin:NAME "
                        f"(default: {DEFAULT_MODEL})")
    _add_method(p, required=False, default_note=" (default: none)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="sampling steps (default: 50)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_model_loading(p)
    p.set_defaults(func=cmd_inspect)

    # bench
    p = sub.add_parser(
        "bench", formatter_class=_Formatter, help="time methods against the uncached model and score their outputs",
        description="Sample the same seeds with each method and with none (always run first) on the same backend: "
                    "median seconds per sampling run, speedup, FLOPs speedup, realization (= speedup / FLOPs "
                    "speedup), fidelity to the uncached output (PSNR, SSIM, relative L2, cosine), and for MNIST "
                    "models classifier accuracy and Fréchet distance; peak and cache memory.",
        epilog=f"examples:\n  graphcache bench {DEFAULT_MODEL} --method all\n"
               f"  graphcache bench {DEFAULT_MODEL} --method fora,toca --set fora.interval=4 --json bench.json --plot plots/\n"
               "  graphcache bench DiT-XL-2-256x256.pt --method toca --repeats 2 --steps 50\n"
               "  graphcache bench DiT-XL-2-256x256.pt --method fora,toca --backend compile --compile-mode reduce-overhead\n"
               "  graphcache bench builtin:pixart-xl2-256-random --method none,fora,toca   (PixArt-α: its pipeline, "
               "DPM-Solver 20 steps, guidance 4.5, one image)\n"
               "  graphcache bench builtin:flux-dev-4x8-random --method none,fora,toca,taylorseer   (FLUX: its "
               "pipeline, flow-matching Euler 28 steps, embedded guidance 3.5, one 512x512 image)\n\n"
               "A text-conditioned model (a PixArt-α or FLUX folder, builtin:pixart-xl2-256-random, "
               "builtin:flux-dev-4x8-random) samples in its diffusers pipeline with graphcache.enable: the scheduler "
               "it ships with and the pipeline's guidance, random prompt embeddings of --text-tokens tokens (PixArt-α: "
               "and negative ones), --image-tokens image tokens, latents out (the VAE is not run); fidelity is "
               "measured on the latents. DuCa and ClusCa do not run on FLUX's two-stream blocks.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"checkpoint file, artifact directory, diffusers DiT folder (run as the built-in DiT), "
                        f"diffusers PixArt-α or FLUX folder or builtin:NAME (default: {DEFAULT_MODEL})")
    p.add_argument("--method", default="all", metavar="M[,M...]|all", help="methods to compare (default: all)")
    p.add_argument("--set", action="append", type=_key_value, metavar="[METHOD.]KEY=VALUE", default=[],
                   help="a method option for every listed method that has it, or for one method with METHOD.KEY")
    _add_backend(p)
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="sampling steps (default: 50; PixArt-α: 20; FLUX: 28, as they sample)")
    p.add_argument("--batch", type=_positive_int, metavar="B",
                   help="images per run (default: 8; text-conditioned: 1)")
    p.add_argument("--image-tokens", type=_positive_int, metavar="N",
                   help="text-conditioned models: image tokens of the square image sampled (default: PixArt-α: its "
                        "config's sample size; FLUX: 1024, 512x512 pixels)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="R", help="timed runs, median reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed runs first (default: 1)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every method first and run them in rounds (none, a, b, none, a, b, ...), so "
                        "that a machine whose speed drifts slows every method alike (default: on for eager "
                        "and compile; off for aoti, onnx and tensorrt, which hold a copy of the weights per "
                        "method)")
    p.add_argument("--seed", type=int, default=0, help="global torch seed (default: 0)")
    p.add_argument("--sampler", choices=SAMPLERS, help="class-conditional DiTs (default: ddim)")
    p.add_argument("--cfg-scale", type=float, metavar="S",
                   help=f"guidance scale (default: {_BUILTIN_CFG_SCALE}; PixArt-α: {PIXART_CFG_SCALE}; FLUX: 3.5, "
                        "embedded)")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, help="class-conditional DiTs (default: official)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write frontier and step x block heatmap PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_loading(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _bench_methods(text: str, given: dict) -> list[tuple[str, dict]]:
    """--method a,b|all with --set key=value (every listed method that has the option) or
    --set method.key=value (that method only)."""
    from .methods import METHODS, get_method

    names = list(METHODS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    methods = [get_method(n) for n in names]
    chosen = []
    used = set()
    for m in methods:
        opts = {}
        for key, value in given.items():
            scope, _, name = key.rpartition(".")
            if (scope in ("", m.name)) and any(o.name == name for o in m.options):
                opts[name] = value
                used.add(key)
        m.resolve_options(opts)  # a bad value fails here, before any model is loaded
        chosen.append((m.name, opts))
    unused = [k for k in given if k not in used]
    if unused:
        raise GraphcacheError(f"--set {unused[0]}: none of the methods {', '.join(names)} has that option")
    return chosen


def _bench_model(model, spec: str):
    """A diffusers DiT is benchmarked as the built-in DiT with its weights, with graphcache's
    class-conditional sampler (graphcache.models.convert_diffusers: the same computation)."""
    if type(model).__name__ != "DiTTransformer2DModel":
        return model
    from .models.convert_diffusers import dit_from_diffusers
    from .models.dit import DiT

    sd, config = dit_from_diffusers(model.state_dict(), model.config)
    dit = DiT(config)
    dit.load_state_dict(sd)
    print(f"{spec}: diffusers DiTTransformer2DModel, benchmarked as the built-in DiT with its weights")
    return dit.eval()


def cmd_bench(args) -> int:
    import json

    from . import bench
    from .diffusers_models import is_text_conditioned

    methods = _bench_methods(args.method, _options(args))
    compile_options = _compile_options(args, args.backend)
    model = _bench_model(_load_model(args.model, args), args.model)
    text = is_text_conditioned(model)
    # a text-conditioned model's session fills in its pipeline's steps and guidance scale
    report = bench.bench(model, methods, backend=args.backend, compile_options=compile_options,
                         hoist_conditioning=args.hoist_conditioning, num_steps=args.steps,
                         batch=args.batch or (1 if text else 8), sampler=args.sampler,
                         cfg_scale=args.cfg_scale if args.cfg_scale is not None or text else _BUILTIN_CFG_SCALE,
                         guidance=args.guidance, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                         interleave=args.interleave, model_name=args.model, progress=not args.quiet,
                         text_tokens=args.text_tokens, image_tokens=args.image_tokens)
    print(bench.format_table(report))
    print(f"FLOPs: {bench.FLOPS_COUNTING}")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        print(f"wrote {args.json}")
    if args.plot:
        for path in bench.plot(report, args.plot):
            print(f"wrote {path}")
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    debug = os.environ.get("GRAPHCACHE_DEBUG", "") not in ("", "0")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            return _fail("choose a command: optimize, sample, schedule, calibrate, methods, inspect, bench (see `graphcache --help`)")
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except (_UsageError, GraphcacheError) as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e))
    except BrokenPipeError:  # `graphcache schedule | head`: the reader left; stop quietly, as a shell tool does
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:  # disk full, permissions, ...: the user's to fix, not a bug
        if debug:
            traceback.print_exc()
        return _fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
