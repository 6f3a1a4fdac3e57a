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
           "load_pipeline", "load_transformer"]

CONFIG = "config.json"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
VAES = ("AutoencoderKL",)
PIPELINES = ("DiTPipeline", "PixArtAlphaPipeline")
# PixArt-α's T5 prompt length (the pipeline's max_sequence_length)
PIXART_TEXT_TOKENS = 120
# the scheduler PixArt-α ships with (DPM-Solver++ multistep, 2nd order by history: one model call per step)
TEXT_PIPELINE_SCHEDULER = "DPMSolverMultistepScheduler"


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
    """A DiT or PixArt-α pipeline folder as a pipeline: transformer, VAE and scheduler, no text
    encoder or tokenizer (PixArt-α then takes prompt embeddings)."""
    path = Path(path)
    if not path.is_dir():
        raise GraphcacheError(f"diffusers pipeline folder not found: {path}")
    index = _model_index(path)
    cls = getattr(diffusers_module(), index["_class_name"])
    components = dict(transformer=_load_component(path / "transformer", TRANSFORMERS, allow_pickle),
                      vae=_load_component(path / "vae", VAES, allow_pickle), scheduler=_scheduler(path / "scheduler"))
    if index["_class_name"] == "PixArtAlphaPipeline":
        components.update(tokenizer=None, text_encoder=None)
    return cls(**components)


def is_text_conditioned(model) -> bool:
    """Whether `model` is a diffusers transformer conditioned on text embeddings (PixArt-α)."""
    return type(model).__name__ == "PixArtTransformer2DModel"


def text_pipeline(transformer: torch.nn.Module):
    """A PixArt-α pipeline around `transformer` that samples latents from prompt embeddings: no
    text encoder, tokenizer or VAE (call it with output_type="latent"), PixArt-α's scheduler."""
    diffusers = diffusers_module()
    scheduler = getattr(diffusers, TEXT_PIPELINE_SCHEDULER)()
    return diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                         scheduler=scheduler)


def example_kwargs(transformer: torch.nn.Module, text_tokens: int = PIXART_TEXT_TOKENS, batch: int = 2) -> dict:
    """Keyword arguments to capture a diffusers DiT or PixArt-α transformer on, from its config:
    one image with classifier-free guidance (batch 2) at the config's sample size, and for PixArt-α
    `text_tokens` caption embeddings."""
    name = type(transformer).__name__
    if name not in TRANSFORMERS:
        raise GraphcacheError(f"no example inputs for a {name} (graphcache derives them for {', '.join(TRANSFORMERS)})")
    config = transformer.config
    param = next(transformer.parameters())
    size = config.sample_size
    kwargs = dict(hidden_states=torch.zeros(batch, config.in_channels, size, size, dtype=param.dtype,
                                            device=param.device),
                  timestep=torch.zeros(batch, dtype=torch.long, device=param.device))
    if name == "DiTTransformer2DModel":
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=param.device)
    else:
        kwargs["encoder_hidden_states"] = torch.zeros(batch, text_tokens, config.caption_channels, dtype=param.dtype,
                                                      device=param.device)
        if transformer.use_additional_conditions:  # PixArt-α at 1024px: the image size in pixels (VAE factor 8)
            pixels = float(size * 8)
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.full((batch, 2), pixels, dtype=param.dtype, device=param.device),
                "aspect_ratio": torch.ones(batch, 1, dtype=param.dtype, device=param.device)}
        else:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kwargs
