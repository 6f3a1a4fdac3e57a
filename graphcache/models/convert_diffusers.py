"""Conversion between the built-in DiT and diffusers' `DiTTransformer2DModel`, both ways.

Works on plain state dicts and config dicts, so graphcache does not import diffusers (an optional
extra, ``pip install graphcache[diffusers]``). With the same weights the two models compute the
same function up to float rounding:

    sd, config = dit_from_diffusers(transformer.state_dict(), transformer.config)
    model = DiT(config)
    model.load_state_dict(sd)

    sd, diffusers_config = dit_to_diffusers(model.state_dict(), model.config)
    transformer = DiTTransformer2DModel.from_config(diffusers_config)
    transformer.load_state_dict(sd)

diffusers' port of facebookresearch/DiT is not the same function of the same weights:

- its timestep frequencies are exp(-ln(1e4) i / 127), facebook's exp(-ln(1e4) i / 128), i < 128:
  a model from diffusers gets DiTConfig.frequency_shift=1, and dit_to_diffusers refuses
  frequency_shift=0 (facebook's frequencies, its checkpoints), which diffusers cannot compute.
- the LayerNorm before each MLP uses diffusers' config norm_eps (default 1e-5), facebook's 1e-6:
  carried by DiTConfig.mlp_norm_eps.
- every block has its own timestep + label embedder (norm1.emb; the final layer reads block 0's)
  where facebook has one: it is copied into every block, and per-block embedders that differ are
  refused.
- the label table always has the null-class row (class_dropout_prob 0.1) and the MLP is 4 wide.

So diffusers' DiT checkpoints, facebook's weights converted by diffusers, convert here to what
diffusers computes with them (frequency_shift=1, mlp_norm_eps=1e-5), not to facebook's DiT.

The rest is layout: fused qkv vs to_q/to_k/to_v; pos_embed is a state-dict entry here and a
buffer diffusers computes there (the same sin-cos table, bitwise in the sizes tested). The adaLN
chunk orders (shift, scale, gate for attention then MLP; shift, scale at the end) and the output
channels (learned variance after the prediction) are the same in both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import GraphcacheError
from ..io import state_dict_problems
from .dit import DiT, DiTConfig, pos_embed_table

__all__ = ["dit_config_from_diffusers", "dit_from_diffusers", "dit_to_diffusers"]

# The settings of DiTTransformer2DModel that the built-in DiT has, and only those.
_ARCHITECTURE = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}
_SIZES = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
          "num_embeds_ada_norm")
# DiTTransformer2DModel.__init__'s defaults (diffusers 0.42) for the keys read here: a config that
# omits one means it. diffusers' own conversion of facebook's checkpoints passes no norm_eps, so
# those models have 1e-5.
_DIFFUSERS_DEFAULTS = {
    **_ARCHITECTURE,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_eps": 1e-5,
}
# diffusers' LabelEmbedding inside CombinedTimestepLabelEmbeddings: always a null-class row.
_DIFFUSERS_CLASS_DROPOUT = 0.1

_PARAMS = ("weight", "bias")
# (built-in module, diffusers module): the same weight and bias under another name
_RENAMES = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
_BLOCK_RENAMES = (
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
)
# (built-in key, key inside each diffusers block): the one embedder, copied per block there
_SHARED = (
    ("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
    ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"),
)


def _key_map(depth: int) -> list[tuple[str, str, list[str]]]:
    """(kind, built-in key, diffusers keys) for every tensor but pos_embed. kind "rename": one key;
    "split": the fused qkv, whose q, k, v row blocks are three keys; "shared": one key per block."""
    entries = [("rename", f"{ours}.{p}", [f"{theirs}.{p}"]) for ours, theirs in _RENAMES for p in _PARAMS]
    entries += [("shared", ours, [f"transformer_blocks.{i}.{theirs}" for i in range(depth)])
                for ours, theirs in _SHARED]
    for i in range(depth):
        for p in _PARAMS:
            qkv = [f"transformer_blocks.{i}.attn1.{name}.{p}" for name in ("to_q", "to_k", "to_v")]
            entries.append(("split", f"blocks.{i}.attn.qkv.{p}", qkv))
            entries += [("rename", f"blocks.{i}.{ours}.{p}", [f"transformer_blocks.{i}.{theirs}.{p}"])
                        for ours, theirs in _BLOCK_RENAMES]
    return entries


def _to_diffusers_tensors(sd: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind, ours, theirs in _key_map(depth):
        tensor = sd[ours]
        if kind == "rename":
            out[theirs[0]] = tensor
        else:
            parts = tensor.chunk(3) if kind == "split" else [tensor] * depth
            # copies, not views: safetensors (save_pretrained) refuses tensors that share memory
            out.update({key: part.clone() for key, part in zip(theirs, parts)})
    return out


def _from_diffusers_tensors(sd: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind, ours, theirs in _key_map(depth):
        if kind == "split":
            out[ours] = torch.cat([sd[key] for key in theirs])
            continue
        first = sd[theirs[0]]
        for key in theirs[1:]:
            if not torch.equal(sd[key], first):
                raise GraphcacheError(
                    f"diffusers DiT: {key} differs from {theirs[0]}: its blocks have their own timestep/label "
                    "embedders, which the built-in DiT (one shared embedder) cannot represent"
                )
        out[ours] = first  # block 0's is also the one diffusers' final layer reads
    return out


def _meta_state_dict(config: DiTConfig) -> dict[str, torch.Tensor]:
    """The built-in DiT's state dict for `config`, shapes only."""
    with torch.device("meta"):
        return DiT(config).state_dict()


def _check(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    problems = state_dict_problems(sd, expected)
    if problems:
        raise GraphcacheError(f"{what} state dict does not match its config: " + "; ".join(problems))


def _check_pos_embed(pos: torch.Tensor, config: DiTConfig) -> None:
    """diffusers computes the sin-cos table instead of storing it: refuse any other table. The
    tolerance is one unit in the last place at 1.0 (the values lie in [-1, 1]) of the stored dtype
    or float32, whichever is coarser: the same table computed by another library or rounded."""
    table = pos_embed_table(config.hidden_size, config.input_size // config.patch_size)
    atol = max(torch.finfo(pos.dtype).eps, torch.finfo(torch.float32).eps)
    if not torch.allclose(pos.detach().float().cpu(), table, rtol=0, atol=atol):
        raise GraphcacheError(
            "pos_embed is not the fixed sin-cos table; diffusers' DiT recomputes that table and cannot hold another"
        )


def _diffusers_config(config: DiTConfig) -> dict:
    if config.frequency_shift != 1:
        raise GraphcacheError(
            f"this DiT has frequency_shift={config.frequency_shift} (facebook's timestep frequencies); diffusers' "
            "DiT hard-codes downscale_freq_shift=1, a different function of the same weights"
        )
    if config.mlp_ratio != 4.0:
        raise GraphcacheError(f"this DiT has mlp_ratio={config.mlp_ratio}; diffusers' DiT has 4")
    if config.class_dropout_prob <= 0:
        raise GraphcacheError(
            "this DiT has no null-class row (class_dropout_prob=0); diffusers' DiT always has one"
        )
    return {
        **_ARCHITECTURE,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels * (2 if config.learn_sigma else 1),
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": config.mlp_norm_eps,
    }


def dit_config_from_diffusers(diffusers_config: Mapping) -> DiTConfig:
    """The built-in DiTConfig of a `DiTTransformer2DModel` config (GraphcacheError if it does not convert)."""
    cfg = {**_DIFFUSERS_DEFAULTS, **diffusers_config}
    for key, value in _ARCHITECTURE.items():
        if cfg[key] != value:
            raise GraphcacheError(f"diffusers DiT config has {key}={cfg[key]!r}; only {value!r} converts")
    bad = [f"{k}={cfg[k]!r}" for k in _SIZES if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1]
    if bad:
        raise GraphcacheError(f"diffusers DiT config: {', '.join(bad)}: expected positive integers")
    in_channels = cfg["in_channels"]
    out_channels = in_channels if cfg["out_channels"] is None else cfg["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise GraphcacheError(
            f"diffusers DiT config has out_channels={out_channels} for in_channels={in_channels}; the built-in "
            f"DiT has {in_channels} or {2 * in_channels} (learned variance)"
        )
    return DiTConfig(
        input_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=in_channels,
        hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        depth=cfg["num_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=4.0,
        class_dropout_prob=_DIFFUSERS_CLASS_DROPOUT,
        num_classes=cfg["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        frequency_shift=1,
        mlp_norm_eps=cfg["norm_eps"],
    )


def dit_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> tuple[dict, dict]:
    """The built-in DiT's `state_dict` (with its `config`) as a `DiTTransformer2DModel` state dict
    and the keyword arguments of its constructor (or `from_config`). The config must have
    frequency_shift=1, mlp_ratio 4 and a null-class row; pos_embed must be the fixed table."""
    _check(state_dict, _meta_state_dict(config), "built-in DiT")
    diffusers_config = _diffusers_config(config)
    _check_pos_embed(state_dict["pos_embed"], config)
    return _to_diffusers_tensors(state_dict, config.depth), diffusers_config


def dit_from_diffusers(state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping) -> tuple[dict, DiTConfig]:
    """A `DiTTransformer2DModel` state dict and config (``transformer.config`` or its config.json)
    as the built-in DiT's state dict and DiTConfig (frequency_shift=1, mlp_norm_eps=norm_eps).
    Every block's timestep/label embedder must be the same."""
    config = dit_config_from_diffusers(diffusers_config)
    expected = _to_diffusers_tensors(_meta_state_dict(config), config.depth)
    _check(state_dict, expected, "diffusers DiT")
    sd = _from_diffusers_tensors(state_dict, config.depth)
    weight = sd["x_embedder.proj.weight"]
    sd["pos_embed"] = pos_embed_table(config.hidden_size, config.input_size // config.patch_size).to(
        device=weight.device, dtype=weight.dtype
    )
    return sd, config
