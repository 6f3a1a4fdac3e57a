"""diffusers model and pipeline folders, loaded safely, and the example inputs that capture them.

A model folder is what `transformer.save_pretrained(dir)` writes (config.json +
diffusion_pytorch_model.safetensors); a pipeline folder is what `pipe.save_pretrained(dir)` writes
(model_index.json + one subfolder per component). Loading reads only JSON and safetensors: the
class is looked up by name among the few diffusers classes graphcache knows (never code from the
folder or the hub), and a pickled .bin weights file is read only with ``allow_pickle=True``,
through `graphcache.io.load_state_dict_file` like every other checkpoint. Text encoders and
tokenizers are not loaded: text-conditioned pipelines run from saved prompt embeddings.

    from graphcache.diffusers_models import load_transformer, example_kwargs
    transformer = load_transformer("pixart/")                    # a pipeline or a model folder
    cached = graphcache.optimize(transformer, "fora", 20, kwargs=example_kwargs(transformer))
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import GraphcacheError, exception_line
from .io import read_json_object

__all__ = ["TRANSFORMERS", "PIPELINES", "example_kwargs", "is_diffusers_folder", "is_pipeline_folder",
           "is_text_conditioned", "load_pipeline", "load_transformer", "text_pipeline"]

CONFIG = "config.json"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel",
                "SD3Transformer2DModel", "WanTransformer3DModel", "HunyuanVideoTransformer3DModel")
VAES = ("AutoencoderKL",)
PIPELINES = ("DiTPipeline", "PixArtAlphaPipeline", "FluxPipeline", "StableDiffusion3Pipeline")
# the components of each text-conditioned pipeline that graphcache does not load: it runs from
# prompt embeddings
TEXT_COMPONENTS = {
    "PixArtAlphaPipeline": ("tokenizer", "text_encoder"),
    "FluxPipeline": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
    "StableDiffusion3Pipeline": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3",
                                 "text_encoder_3"),
}
# prompt lengths of the released models (their pipelines' max_sequence_length): PixArt-α's T5,
# FLUX.1-dev's T5, SD3's 77 CLIP tokens followed by 256 T5 tokens, Wan 2.1's umT5, HunyuanVideo's Llama
PIXART_TEXT_TOKENS = 120
FLUX_TEXT_TOKENS = 512
SD3_TEXT_TOKENS = 77 + 256
WAN_TEXT_TOKENS = 512
HUNYUAN_VIDEO_TEXT_TOKENS = 256
# latent sizes at the pipelines' default resolutions (8 pixels per latent pixel): FLUX 1024×1024
# (its config has no sample_size), Wan 2.1 480×832, HunyuanVideo 720×1280
FLUX_LATENT_SIZE = (128, 128)
WAN_LATENT_SIZE = (60, 104)
HUNYUAN_VIDEO_LATENT_SIZE = (90, 160)
PIXART_CFG_SCALE = 4.5  # the PixArt-α pipeline's default guidance scale
# the scheduler PixArt-α ships with (DPM-Solver++ multistep, 2nd order by history: one model call per step)
TEXT_PIPELINE_SCHEDULER = "DPMSolverMultistepScheduler"
# FLUX and SD3 sample with flow matching: Euler steps on the velocity, one model call per step,
# with the timestep shift of the released schedulers (FLUX.1-dev's grows with the image's tokens)
FLOW_MATCHING_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLUX_SCHEDULER_SETTINGS = {"shift": 3.0, "use_dynamic_shifting": True}
SD3_SCHEDULER_SETTINGS = {"shift": 3.0}


def diffusers_module():
    """diffusers, imported only when a diffusers folder is used."""
    try:
        import diffusers
    except ImportError as e:
        raise GraphcacheError(f"diffusers folders need the diffusers extra: pip install 'graphcache[diffusers]' "
                              f"({exception_line(e)})") from e
    return diffusers


def is_diffusers_folder(path) -> bool:
    """True for a directory holding a diffusers config.json or model_index.json."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG).is_file() or (path / MODEL_INDEX).is_file())


def is_pipeline_folder(path) -> bool:
    """True for a directory holding a diffusers model_index.json."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise GraphcacheError(f"{path.parent}: not a diffusers folder or a graphcache artifact: it has no {path.name}")
    return read_json_object(path)


def _diffusers_class(name, allowed: tuple[str, ...], where: Path):
    """The diffusers class `name`, if it is one of `allowed` (a config names any class it likes)."""
    if name not in allowed:
        raise GraphcacheError(f"{where}: class {name!r} is not supported (graphcache loads {', '.join(allowed)})")
    return getattr(diffusers_module(), name)


def _weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from .io import load_state_dict_file

    safe, pickled = folder / SAFE_WEIGHTS, folder / PICKLE_WEIGHTS
    if safe.is_file():
        return load_state_dict_file(safe)
    if pickled.is_file():
        if not allow_pickle:
            raise GraphcacheError(f"{pickled}: pickled weights can run code from the file; use a .safetensors "
                                  "folder, or pass allow_pickle=True (CLI: --allow-pickle) only if you trust it")
        return load_state_dict_file(pickled, allow_pickle=True)
    raise GraphcacheError(f"{folder}: no weights file ({SAFE_WEIGHTS})")


def _load_component(folder: Path, allowed: tuple[str, ...], allow_pickle: bool) -> torch.nn.Module:
    """A diffusers model from its config.json and weights: built from the config, then given
    exactly the file's tensors (a missing, extra or misshapen tensor is an error, not a warning)."""
    from .io import state_dict_problems

    config = _read_json(folder / CONFIG)
    cls = _diffusers_class(config.get("_class_name"), allowed, folder / CONFIG)
    sd = _weights(folder, allow_pickle)
    try:
        model = cls.from_config(config)
    except Exception as e:
        raise GraphcacheError(f"{folder / CONFIG}: invalid {cls.__name__} config: {exception_line(e)}") from e
    problems = state_dict_problems(sd, model.state_dict())
    if problems:
        raise GraphcacheError(f"{folder}: weights do not match its {cls.__name__} config: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _model_index(path: Path) -> dict:
    index = _read_json(path / MODEL_INDEX)
    _diffusers_class(index.get("_class_name"), PIPELINES, path / MODEL_INDEX)
    return index


def load_transformer(path, *, allow_pickle: bool = False) -> torch.nn.Module:
    """The transformer of a diffusers model folder, or of a pipeline folder's transformer/."""
    path = Path(path)
    if not path.is_dir():
        raise GraphcacheError(f"diffusers folder not found: {path}")
    if (path / MODEL_INDEX).is_file():
        _model_index(path)
        path = path / "transformer"
    return _load_component(path, TRANSFORMERS, allow_pickle)


def _scheduler(folder: Path):
    config = _read_json(folder / SCHEDULER_CONFIG)
    diffusers = diffusers_module()
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise GraphcacheError(f"{folder / SCHEDULER_CONFIG}: {name!r} is not a diffusers scheduler")
    try:
        return cls.from_config(config)
    except Exception as e:
        raise GraphcacheError(f"{folder / SCHEDULER_CONFIG}: invalid {name} config: {exception_line(e)}") from e


def load_pipeline(path, *, allow_pickle: bool = False):
    """A DiT, PixArt-α, FLUX or SD3 pipeline folder as a pipeline: transformer, VAE and scheduler,
    no text encoder or tokenizer (the text-conditioned ones then take prompt embeddings)."""
    path = Path(path)
    if not path.is_dir():
        raise GraphcacheError(f"diffusers pipeline folder not found: {path}")
    index = _model_index(path)
    cls = getattr(diffusers_module(), index["_class_name"])
    components = dict(transformer=_load_component(path / "transformer", TRANSFORMERS, allow_pickle),
                      vae=_load_component(path / "vae", VAES, allow_pickle), scheduler=_scheduler(path / "scheduler"))
    components.update(dict.fromkeys(TEXT_COMPONENTS.get(index["_class_name"], ()), None))
    return cls(**components)


# the pipeline that samples each text-conditioned transformer, its scheduler and the settings
# that differ from the scheduler's defaults
TEXT_PIPELINES = {
    "PixArtTransformer2DModel": ("PixArtAlphaPipeline", TEXT_PIPELINE_SCHEDULER, {}),
    "FluxTransformer2DModel": ("FluxPipeline", FLOW_MATCHING_SCHEDULER, FLUX_SCHEDULER_SETTINGS),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", FLOW_MATCHING_SCHEDULER, SD3_SCHEDULER_SETTINGS),
}


def is_text_conditioned(model) -> bool:
    """Whether `model` is a diffusers transformer graphcache samples in its text-to-image pipeline
    (PixArt-α, FLUX, SD3)."""
    return type(model).__name__ in TEXT_PIPELINES


def text_pipeline(transformer: torch.nn.Module):
    """The text-to-image pipeline around `transformer` that samples latents from prompt embeddings:
    no text encoder, tokenizer or VAE (call it with output_type="latent"), the scheduler the model
    ships with (PixArt-α: DPM-Solver multistep; FLUX, SD3: flow-matching Euler)."""
    name = type(transformer).__name__
    if name not in TEXT_PIPELINES:
        raise GraphcacheError(f"no text-to-image pipeline for a {name} (graphcache samples "
                              f"{', '.join(TEXT_PIPELINES)} in theirs)")
    diffusers = diffusers_module()
    pipeline, scheduler, settings = TEXT_PIPELINES[name]
    components = dict.fromkeys(TEXT_COMPONENTS[pipeline], None)
    return getattr(diffusers, pipeline)(vae=None, transformer=transformer,
                                        scheduler=getattr(diffusers, scheduler)(**settings), **components)


class _Example:
    """Zero tensors for one example call, on the model's device, in its dtype unless told."""

    def __init__(self, transformer: torch.nn.Module):
        param = next(transformer.parameters())
        self.dtype, self.device = param.dtype, param.device

    def __call__(self, *shape, dtype=None, fill: float = 0.0) -> torch.Tensor:
        return torch.full(shape, fill, dtype=dtype or self.dtype, device=self.device)


def _dit_kwargs(model, tensor, batch, text_tokens, frames):
    config = model.config
    return dict(hidden_states=tensor(batch, config.in_channels, config.sample_size, config.sample_size),
                timestep=tensor(batch, dtype=torch.long), class_labels=tensor(batch, dtype=torch.long))


def _pixart_kwargs(model, tensor, batch, text_tokens, frames):
    config = model.config
    size = config.sample_size
    kwargs = dict(hidden_states=tensor(batch, config.in_channels, size, size),
                  encoder_hidden_states=tensor(batch, text_tokens, config.caption_channels),
                  timestep=tensor(batch, dtype=torch.long))
    if model.use_additional_conditions:  # PixArt-α at 1024px: the image size in pixels (VAE factor 8)
        kwargs["added_cond_kwargs"] = {"resolution": tensor(batch, 2, fill=float(size * 8)),
                                       "aspect_ratio": tensor(batch, 1, fill=1.0)}
    else:
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kwargs


def _flux_kwargs(model, tensor, batch, text_tokens, frames):
    """FluxPipeline's call: latents packed as 2×2 patches (in_channels counts a patch's channels),
    positions of the image and text tokens without a batch dimension, timesteps in [0, 1], and the
    guidance scale where the model embeds it (FLUX.1-dev; not FLUX.1-schnell)."""
    config = model.config
    tokens = (FLUX_LATENT_SIZE[0] // 2) * (FLUX_LATENT_SIZE[1] // 2)
    kwargs = dict(hidden_states=tensor(batch, tokens, config.in_channels),
                  encoder_hidden_states=tensor(batch, text_tokens, config.joint_attention_dim),
                  pooled_projections=tensor(batch, config.pooled_projection_dim), timestep=tensor(batch),
                  img_ids=tensor(tokens, 3), txt_ids=tensor(text_tokens, 3))
    if config.guidance_embeds:
        kwargs["guidance"] = tensor(batch, dtype=torch.float32)
    return kwargs


def _sd3_kwargs(model, tensor, batch, text_tokens, frames):
    config = model.config
    size = config.sample_size
    return dict(hidden_states=tensor(batch, config.in_channels, size, size),
                encoder_hidden_states=tensor(batch, text_tokens, config.joint_attention_dim),
                pooled_projections=tensor(batch, config.pooled_projection_dim),
                timestep=tensor(batch, dtype=torch.float32))


def _wan_kwargs(model, tensor, batch, text_tokens, frames):
    config = model.config
    return dict(hidden_states=tensor(batch, config.in_channels, frames, *WAN_LATENT_SIZE),
                timestep=tensor(batch, dtype=torch.float32),
                encoder_hidden_states=tensor(batch, text_tokens, config.text_dim))


def _hunyuan_video_kwargs(model, tensor, batch, text_tokens, frames):
    config = model.config
    kwargs = dict(hidden_states=tensor(batch, config.in_channels, frames, *HUNYUAN_VIDEO_LATENT_SIZE),
                  timestep=tensor(batch, dtype=torch.float32),
                  encoder_hidden_states=tensor(batch, text_tokens, config.text_embed_dim),
                  encoder_attention_mask=tensor(batch, text_tokens, fill=1.0),
                  pooled_projections=tensor(batch, config.pooled_projection_dim))
    if config.guidance_embeds:
        kwargs["guidance"] = tensor(batch)
    return kwargs


# per transformer: its example call, its default prompt length, and the batch its pipeline passes
# (2 where guidance's two halves go in one call; FLUX guides by embedding, Wan and HunyuanVideo
# call the model once per guidance branch)
EXAMPLES = {
    "DiTTransformer2DModel": (_dit_kwargs, None, 2),
    "PixArtTransformer2DModel": (_pixart_kwargs, PIXART_TEXT_TOKENS, 2),
    "FluxTransformer2DModel": (_flux_kwargs, FLUX_TEXT_TOKENS, 1),
    "SD3Transformer2DModel": (_sd3_kwargs, SD3_TEXT_TOKENS, 2),
    "WanTransformer3DModel": (_wan_kwargs, WAN_TEXT_TOKENS, 1),
    "HunyuanVideoTransformer3DModel": (_hunyuan_video_kwargs, HUNYUAN_VIDEO_TEXT_TOKENS, 1),
}


def example_kwargs(transformer: torch.nn.Module, text_tokens: int | None = None, batch: int | None = None,
                   frames: int = 1) -> dict:
    """Keyword arguments to capture a diffusers transformer on, from its config: one image (or a
    video of `frames` latent frames) at the config's sample size or its pipeline's default
    resolution, in the batch its pipeline passes (CFG in one batch: 2), with `text_tokens` prompt
    embeddings (default: the released model's prompt length) for the text-conditioned ones."""
    name = type(transformer).__name__
    if name not in EXAMPLES:
        raise GraphcacheError(f"no example inputs for a {name} (graphcache derives them for {', '.join(EXAMPLES)})")
    build, default_text_tokens, default_batch = EXAMPLES[name]
    return build(transformer, _Example(transformer), default_batch if batch is None else batch,
                 default_text_tokens if text_tokens is None else text_tokens, frames)
