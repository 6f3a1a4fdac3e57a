"""Built-in models, addressed as ``builtin:NAME`` wherever a model path is accepted.

An entry is either generated on the fly (a reference architecture with random weights: nothing is
downloaded) or a weights file shipped inside the package in ``graphcache/weights/`` (a
``.safetensors`` file whose metadata carries its config, loaded with `graphcache.io.load_model`).
Hidden entries work everywhere but are left out of listings and error messages: they exist for
the test suite.

    from graphcache.models.builtin import resolve_model
    model = resolve_model("builtin:dit-s2-random")     # DiT-S/2, random N(0, 0.02) weights
    model = resolve_model("DiT-XL-2-256x256.pt")       # any checkpoint path, via io.load_model
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import GraphcacheError
from .dit import DiT, DiTConfig, dit_config, init_random_

PREFIX = "builtin:"
# The model the CLI and the docs use when none is named: the trained MNIST DiT shipped in
# graphcache/weights/ (tools/train_mnist_dit.py; 99 % classifier accuracy on its own samples).
DEFAULT_MODEL = "builtin:mnist-dit"

__all__ = ["BUILTINS", "DEFAULT_MODEL", "PREFIX", "BuiltinModel", "available", "is_builtin", "resolve_model"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str  # without the "builtin:" prefix
    summary: str
    config: DiTConfig | None = None  # generated: this architecture ...
    seed: int = 0  # ... filled by init_random_(seed=seed)
    weights: str | None = None  # shipped: a file name in graphcache/weights/
    hidden: bool = False  # left out of listings (test fixtures)
    make: Callable[[int], nn.Module] | None = None  # generated another way: make(seed) -> a random model

    @property
    def spec(self) -> str:
        return PREFIX + self.name

    def load(self, *, allow_pickle: bool = False) -> nn.Module:
        if self.make is not None:
            return self.make(self.seed).eval()
        if self.weights is not None:
            from ..io import load_model

            path = Path(str(resources.files("graphcache").joinpath("weights", self.weights)))
            if not path.is_file():
                raise GraphcacheError(
                    f"{self.spec}: its weights file weights/{self.weights} is not part of this installation"
                )
            return load_model(path, allow_pickle=allow_pickle)
        if self.config is None:
            raise GraphcacheError(f"{self.spec}: has neither a config nor a weights file")
        return init_random_(DiT(self.config), seed=self.seed).eval()


# FLUX.1-dev's transformer widths (diffusers' FluxTransformer2DModel config) at 4 double-stream and
# 8 single-stream blocks instead of 19 and 38: a model whose blocks, token counts and caching
# behaviour are FLUX's at a size a CPU benchmark can run
FLUX_DEV_4X8_CONFIG = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter N(0, 0.02): diffusers' own initialisation zeroes the adaLN gates and output
    projections, which would make every caching method trivially exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _pixart_xl2_256(seed: int) -> nn.Module:
    """PixArt-α's transformer at 256px (diffusers' PixArtTransformer2DModel: 28 blocks, hidden 1152,
    16 heads, T5-XXL captions of width 4096), every parameter N(0, 0.02)."""
    from ..diffusers_models import diffusers_module

    return _randomize_(diffusers_module().PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        use_additional_conditions=False), seed)


def _flux_dev_4x8(seed: int) -> nn.Module:
    """FLUX_DEV_4X8_CONFIG's FluxTransformer2DModel, every parameter N(0, 0.02)."""
    from ..diffusers_models import diffusers_module

    return _randomize_(diffusers_module().FluxTransformer2DModel(**FLUX_DEV_4X8_CONFIG), seed)


def _register(*models: BuiltinModel) -> dict[str, BuiltinModel]:
    return {m.name: m for m in models}


BUILTINS: dict[str, BuiltinModel] = _register(
    BuiltinModel(
        "dit-s2-random",
        "DiT-S/2, 32x32x4 latents (256px), 1000 classes, random N(0, 0.02) weights (seed 0)",
        config=dit_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000),
    ),
    BuiltinModel(
        # trained by tools/train_mnist_dit.py; stored fp16, load_model copies it into a float32 DiT
        "mnist-dit",
        "trained MNIST DiT: 32x32x1 pixels in [-1, 1], patch 2 (256 tokens), hidden 64, depth 4, "
        "4 heads, 10 digit classes, learned variance (fp16 weights, shipped)",
        weights="mnist-dit.safetensors",
    ),
    BuiltinModel(
        "dit-xl2-random",
        "DiT-XL/2-shaped (675M parameters), 32x32x4 latents, 1000 classes, random N(0, 0.02) weights: "
        "for speed benchmarks at the papers' model size",
        config=dit_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000),
    ),
    BuiltinModel(
        "pixart-xl2-256-random",
        "PixArt-α-shaped (diffusers PixArtTransformer2DModel, 611M parameters): 32x32x4 latents (256 image "
        "tokens), cross-attention to 4096-wide captions, random N(0, 0.02) weights: for speed benchmarks "
        "(needs graphcache[diffusers])",
        make=_pixart_xl2_256,
    ),
    BuiltinModel(
        "flux-dev-4x8-random",
        "FLUX.1-dev-shaped at reduced depth (diffusers FluxTransformer2DModel: hidden 3072 = 24 heads x 128, "
        "4 double-stream + 8 single-stream blocks instead of 19 + 38, 4096-wide T5 and 768-wide pooled text "
        "embeddings, guidance embedding; 2.6B parameters, 10 GB in fp32), random N(0, 0.02) weights: for speed "
        "benchmarks, where it samples 1024 image tokens (512x512) and 256 text tokens (needs graphcache[diffusers])",
        make=_flux_dev_4x8,
    ),
    BuiltinModel(
        "dit-tiny-random",
        "tiny DiT (hidden 64, depth 2, 4 heads), 8x8x4 inputs, 10 classes, random weights: for tests",
        config=DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                         num_classes=10),
        hidden=True,
    ),
)


def available(include_hidden: bool = False) -> list[BuiltinModel]:
    return [m for m in BUILTINS.values() if include_hidden or not m.hidden]


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve_model(spec, *, allow_pickle: bool = False, num_heads: int | None = None) -> nn.Module:
    """The model named by `spec`: ``builtin:NAME`` or a checkpoint path (see graphcache.io)."""
    if is_builtin(spec):
        name = spec[len(PREFIX):]
        entry = BUILTINS.get(name)
        if entry is None:
            names = ", ".join(m.spec for m in available())
            raise GraphcacheError(f"unknown built-in model {spec!r}; available: {names}")
        model = entry.load(allow_pickle=allow_pickle)
        if num_heads is not None:
            heads = getattr(model.config, "num_heads", None) or model.config.num_attention_heads
            if int(num_heads) != heads:
                raise GraphcacheError(
                    f"{spec} has {heads} attention heads; num_heads (--num-heads) only applies to checkpoint files"
                )
        return model
    from ..io import load_model

    return load_model(spec, num_heads=num_heads, allow_pickle=allow_pickle)
