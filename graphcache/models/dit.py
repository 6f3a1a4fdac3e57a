"""The reference DiT (facebookresearch/DiT), with the exact parameter names of the public checkpoints.

Written from the architecture of Peebles & Xie, "Scalable Diffusion Models with Transformers"
(ICCV 2023, arXiv 2212.09748) and the repository's `models.py`: adaLN-Zero blocks, a timm-style
attention (fused qkv, scaled-dot-product attention) and MLP (fc1, tanh-GELU, fc2), a sin-cos
positional embedding that is part of the state dict. The forward is free of data-dependent Python
so one capture serves any batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraphcacheError


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # The timestep frequencies are exp(-ln(1e4) * i / (128 - frequency_shift)), i < 128: 0 is
    # facebook's DiT; 1 is diffusers' port (Timesteps(downscale_freq_shift=1)), a different function
    # of the same weights, kept so that models converted from diffusers compute what they did there.
    frequency_shift: int = 0
    # eps of the LayerNorm before each block's MLP: 1e-6 in facebook's DiT; diffusers' port takes its
    # config's norm_eps there (default 1e-5, also in its conversions of the facebook checkpoints).
    mlp_norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


_SIZES = {  # name: (depth, hidden_size, num_heads), as published
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=patch)
    for size, (d, h, nh) in _SIZES.items()
    for patch in (2, 4, 8)
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The config of a published size ("DiT-XL/2", …), with optional overrides (input_size, …)."""
    if name not in DIT_CONFIGS:
        raise GraphcacheError(f"unknown DiT size {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name], **overrides})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed without a norm: a strided conv, then (B, C, h, w) -> (B, h*w, C)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original, unrespaced) timestep, cos first, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, frequency_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0, frequency_shift: int = 0):
        """The (len(t), dim) features; frequency_shift as in DiTConfig."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / (half - frequency_shift)
        )
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        # the features are float32, as in the reference; a model whose weights are in another
        # dtype (bf16, say) takes them in its own (a no-op for float32 weights)
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, frequency_shift=self.frequency_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, drop_ids=None):
        # Label dropout is a training-time concern: the training tool passes drop_ids explicitly,
        # so the inference graph has no random branch in it.
        if drop_ids is not None:
            labels = torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm's Attention (qkv_bias, no q/k norm) using scaled-dot-product attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """timm's Mlp: fc1, tanh-approximated GELU, fc2 (dropout and norm are identities in DiT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT. forward(x (B,C,H,W), t (B,) original timesteps, y (B,) labels)."""

    def __init__(self, config: DiTConfig | None = None, **kwargs):
        super().__init__()
        config = config or DiTConfig(**kwargs)
        if config.hidden_size % config.num_heads:
            raise GraphcacheError(
                f"hidden size {config.hidden_size} is not divisible by {config.num_heads} heads"
            )
        if config.input_size % config.patch_size:
            raise GraphcacheError(
                f"input size {config.input_size} is not divisible by patch size {config.patch_size}"
            )
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.input_size = config.input_size
        self.learn_sigma = config.learn_sigma
        self.num_classes = config.num_classes
        h = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, h)
        self.t_embedder = TimestepEmbedder(h, frequency_shift=config.frequency_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, h, config.class_dropout_prob)
        grid = config.input_size // config.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, h), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(h, config.num_heads, config.mlp_ratio, config.mlp_norm_eps) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(h, config.patch_size, self.out_channels)
        self.pos_embed.data.copy_(pos_embed_table(h, grid))

    def unpatchify(self, x, height, width):
        """(B, h*w, p*p*c) -> (B, c, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        h, w = height // p, width // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        height, width = x.shape[2], x.shape[3]
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x, height, width)


def init_random_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Fill EVERY parameter with N(0, std) — adaLN gates included.

    DiT's published initialisation zeroes the adaLN modulation, which makes every block an identity
    and any cache trivially exact; tests and benchmarks need weights where caching matters. The
    fixed positional embedding is left as it is (it is not a learned weight).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def pos_embed_table(hidden_size: int, grid_size: int) -> torch.Tensor:
    """DiT.pos_embed's value: the sin-cos table as float32, (1, grid*grid, hidden_size)."""
    return torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid_size)).float().unsqueeze(0)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE-style fixed 2D sin-cos embedding, (grid*grid, embed_dim), as in the reference code."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
