"""graphcache.models.convert_diffusers: the built-in DiT <-> diffusers' DiTTransformer2DModel.

Equivalence tests run both models on the same random weights, every tensor drawn: the published
inits zero the adaLN gates and the final layer, which would hide a wrong chunk order."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from graphcache.errors import GraphcacheError
from graphcache.models.convert_diffusers import _DIFFUSERS_DEFAULTS, dit_from_diffusers, dit_to_diffusers
from graphcache.models.dit import DiT, DiTConfig, init_random_, pos_embed_table

SMALL = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
             sample_size=8, patch_size=2, num_embeds_ada_norm=10)
# The built-in DiT with the same architecture as SMALL (diffusers' timestep frequencies).
BUILTIN = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                    num_classes=10, frequency_shift=1)
# Largest output difference allowed, relative to the largest output. The two models agree bit for
# bit on this CPU (the split q/k/v GEMMs produce the same rows as the fused one), but another BLAS
# or device may sum the fused and the split GEMMs in other orders: 1e-5 leaves float32 rounding
# (6e-8 relative) ~100 ulps, and the smallest layout mistake test_tolerance_catches_layout_mistakes
# measures is over 1000 times larger.
RTOL = 1e-5
# Weight scales: 0.02, that of DiT's init and of init_random_; and 0.1, where attention logits and
# adaLN gates are of order 1. At 0.02 the attention is nearly uniform, so a q/k mix-up moves the
# outputs by only ~1e-6 relative.
STDS = (0.02, 0.1)


def _inputs():
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 17, 0, 500])  # integer timesteps, as samplers pass them
    y = torch.tensor([1, 9, 10, 3])  # 10: the null class
    return x, t, y


def _random_diffusers(std=0.02, **config):
    """A DiTTransformer2DModel with every tensor N(0, std) and every block's embedder the same
    (as in diffusers' conversions of facebook's checkpoints)."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.DiTTransformer2DModel(**{**SMALL, **config}).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def _builtin(sd, config):
    model = DiT(config).eval()
    model.load_state_dict(sd)  # strict: every key, every shape
    return model


def _to_diffusers_model(sd, diffusers_config):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.DiTTransformer2DModel.from_config(diffusers_config).eval()
    model.load_state_dict(sd)
    return model


def _relative_diff(diffusers_model, builtin_model) -> float:
    """max |diffusers - built-in| / max |diffusers| over the outputs for the same inputs."""
    x, t, y = _inputs()
    with torch.no_grad():
        # both lay out learned-variance models' output channels as (prediction, variance)
        theirs = diffusers_model(x, timestep=t, class_labels=y).sample
        return ((theirs - builtin_model(x, t, y)).abs().max() / theirs.abs().max()).item()


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype and torch.equal(tensor, b[key]), key


def _err(fn, *args) -> str:
    with pytest.raises(GraphcacheError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- diffusers -> built-in


@pytest.mark.parametrize("std", STDS)
@pytest.mark.parametrize("out_channels", [8, 4], ids=["learn_sigma", "no_sigma"])
def test_from_diffusers_computes_the_same_function(out_channels, std):
    theirs = _random_diffusers(std, out_channels=out_channels)
    sd, config = dit_from_diffusers(theirs.state_dict(), theirs.config)
    assert config == DiTConfig(**{**BUILTIN.to_dict(), "learn_sigma": out_channels == 8, "mlp_norm_eps": 1e-5})
    ours = _builtin(sd, config)
    assert _relative_diff(theirs, ours) <= RTOL
    # the eps of the pre-MLP LayerNorm moves these outputs by less than RTOL: checked here
    assert all(b.norm2.eps == t.norm3.eps == 1e-5 for b, t in zip(ours.blocks, theirs.transformer_blocks))


def test_diffusers_state_dict_round_trips_exactly():
    theirs = _random_diffusers(norm_eps=1e-6)  # not the default: it must survive the trip too
    sd, config = dit_from_diffusers(theirs.state_dict(), theirs.config)
    back, back_config = dit_to_diffusers(sd, config)
    _assert_same_tensors(back, theirs.state_dict())
    rebuilt = _to_diffusers_model(back, back_config)
    assert {k: v for k, v in rebuilt.config.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.config.items() if not k.startswith("_")
    }


def test_facebook_frequencies_are_another_function():
    """Loaded with frequency_shift=0 instead of 1, the converted model leaves diffusers' outputs."""
    theirs = _random_diffusers()
    sd, config = dit_from_diffusers(theirs.state_dict(), theirs.config)
    facebook = _builtin(sd, DiTConfig(**{**config.to_dict(), "frequency_shift": 0}))
    assert _relative_diff(theirs, facebook) > 100 * RTOL


@pytest.mark.parametrize("mistake", ["final shift/scale", "q/k", "gate_msa/shift_mlp"])
def test_tolerance_catches_layout_mistakes(mistake):
    """Every plausible layout mistake moves the outputs far beyond RTOL (at std 0.1: see STDS)."""
    theirs = _random_diffusers(0.1)
    sd, config = dit_from_diffusers(theirs.state_dict(), theirs.config)
    h = config.hidden_size
    key, order = {
        "final shift/scale": ("final_layer.adaLN_modulation.1.weight", [1, 0]),
        "q/k": ("blocks.1.attn.qkv.weight", [1, 0, 2]),
        "gate_msa/shift_mlp": ("blocks.0.adaLN_modulation.1.weight", [0, 1, 3, 2, 4, 5]),
    }[mistake]
    chunks = sd[key].split(h)
    sd[key] = torch.cat([chunks[i] for i in order])
    assert _relative_diff(theirs, _builtin(sd, config)) > 1000 * RTOL


def test_untied_embedders_are_refused():
    theirs = _random_diffusers()
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1e-3
    msg = _err(dit_from_diffusers, theirs.state_dict(), theirs.config)
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight differs from" in msg
    assert "one shared embedder" in msg


# ---------------------------------------------------------------- built-in -> diffusers


@pytest.mark.parametrize("std", STDS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_to_diffusers_computes_the_same_function(learn_sigma, std):
    config = DiTConfig(**{**BUILTIN.to_dict(), "learn_sigma": learn_sigma})
    ours = init_random_(DiT(config), std=std).eval()
    sd, diffusers_config = dit_to_diffusers(ours.state_dict(), config)
    theirs = _to_diffusers_model(sd, diffusers_config)
    assert _relative_diff(theirs, ours) <= RTOL
    assert theirs.config.norm_eps == 1e-6 and theirs.out_channels == (8 if learn_sigma else 4)
    # the shared embedder is in every block, as independent tensors (safetensors refuses shared ones)
    tables = [sd[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] for i in range(2)]
    assert torch.equal(tables[0], tables[1]) and tables[0].data_ptr() != tables[1].data_ptr()


def test_builtin_state_dict_round_trips_exactly():
    ours = init_random_(DiT(BUILTIN))
    sd, config = dit_from_diffusers(*dit_to_diffusers(ours.state_dict(), BUILTIN))
    assert config == BUILTIN
    _assert_same_tensors(sd, ours.state_dict())  # pos_embed included: recomputed, the same table


@pytest.mark.parametrize("hidden,grid", [(64, 4), (384, 16), (1152, 32)])
def test_diffusers_computes_the_same_pos_embed(hidden, grid):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    theirs = embeddings.get_2d_sincos_pos_embed(hidden, grid, base_size=grid, output_type="pt")
    assert torch.equal(theirs.float().unsqueeze(0), pos_embed_table(hidden, grid))


def test_defaults_are_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters
    assert _DIFFUSERS_DEFAULTS == {k: params[k].default for k in _DIFFUSERS_DEFAULTS}


def test_package_does_not_import_diffusers():
    code = "import sys, graphcache.models.convert_diffusers; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- errors (no diffusers needed)


@pytest.fixture(scope="module")
def converted():
    """A diffusers state dict and config, made from a random built-in DiT."""
    return dit_to_diffusers(init_random_(DiT(BUILTIN)).state_dict(), BUILTIN)


def test_diffusers_missing_and_unexpected_keys(converted):
    sd, config = converted
    sd = dict(sd)
    del sd["transformer_blocks.1.attn1.to_k.weight"]
    sd["transformer_blocks.1.attn2.to_k.weight"] = torch.zeros(64, 64)
    msg = _err(dit_from_diffusers, sd, config)
    assert "missing keys: transformer_blocks.1.attn1.to_k.weight" in msg
    assert "unexpected keys: transformer_blocks.1.attn2.to_k.weight" in msg


def test_diffusers_shape_mismatch(converted):
    sd, config = converted
    msg = _err(dit_from_diffusers, sd, {**config, "num_embeds_ada_norm": 12})
    assert "shape mismatch" in msg and "class_embedder.embedding_table.weight [11, 64] vs [13, 64]" in msg


@pytest.mark.parametrize("change,expected", [
    ({"norm_type": "ada_norm_single"}, "norm_type='ada_norm_single'; only 'ada_norm_zero' converts"),
    ({"activation_fn": "geglu"}, "activation_fn='geglu'"),
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine=True"),
    ({"out_channels": 5}, "out_channels=5 for in_channels=4"),
    ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm=None: expected positive integers"),
    ({"sample_size": [8, 8]}, "sample_size=[8, 8]"),
])
def test_unsupported_diffusers_config(converted, change, expected):
    sd, config = converted
    assert expected in _err(dit_from_diffusers, sd, {**config, **change})


def test_missing_config_keys_take_diffusers_defaults(converted):
    """A config.json that omits norm_eps (diffusers' conversions of facebook's checkpoints) means 1e-5."""
    sd, _ = converted
    assert dit_from_diffusers(sd, SMALL)[1] == DiTConfig(**{**BUILTIN.to_dict(), "mlp_norm_eps": 1e-5})


@pytest.mark.parametrize("change,expected", [
    ({"frequency_shift": 0}, "frequency_shift=0 (facebook's timestep frequencies)"),
    ({"mlp_ratio": 2.0}, "mlp_ratio=2.0"),
    ({"class_dropout_prob": 0.0, "num_classes": 11}, "no null-class row"),
])
def test_unrepresentable_builtin_config(change, expected):
    config = DiTConfig(**{**BUILTIN.to_dict(), **change})
    with torch.device("meta"):
        sd = DiT(config).state_dict()
    assert expected in _err(dit_to_diffusers, sd, config)


def test_builtin_errors():
    sd = init_random_(DiT(BUILTIN)).state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"}
    assert "missing keys: blocks.1.attn.qkv.bias" in _err(dit_to_diffusers, missing, BUILTIN)
    moved = {**sd, "pos_embed": sd["pos_embed"] + 1e-4}
    assert "pos_embed is not the fixed sin-cos table" in _err(dit_to_diffusers, moved, BUILTIN)
    # the same table rounded to half precision still converts
    dit_to_diffusers({k: v.half() for k, v in sd.items()}, BUILTIN)
