"""graphcache.models.dit: parameter layout of the public checkpoints, tracing, fixed embeddings."""

import math

import pytest
import torch
import torch.fx

from graphcache.models.dit import DIT_CONFIGS, DiT, DiTConfig, TimestepEmbedder, dit_config, init_random_

SMALL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _xl2_expected_shapes():
    """The state dict of facebookresearch/DiT's DiT-XL-2-256x256.pt, written out by hand."""
    C = 1152
    shapes = {
        "x_embedder.proj.weight": (C, 4, 2, 2),
        "x_embedder.proj.bias": (C,),
        "pos_embed": (1, 256, C),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (1001, C),
        "final_layer.linear.weight": (32, C),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, C),
        "final_layer.adaLN_modulation.1.bias": (2304,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "attn.qkv.weight": (3456, C),
                b + "attn.qkv.bias": (3456,),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "mlp.fc1.weight": (4608, C),
                b + "mlp.fc1.bias": (4608,),
                b + "mlp.fc2.weight": (C, 4608),
                b + "mlp.fc2.bias": (C,),
                b + "adaLN_modulation.1.weight": (6912, C),
                b + "adaLN_modulation.1.bias": (6912,),
            }
        )
    return shapes


def test_xl2_state_dict_matches_official_checkpoint():
    with torch.device("meta"):
        model = DiT(dit_config("DiT-XL/2"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _xl2_expected_shapes()
    assert not model.pos_embed.requires_grad
    assert model.blocks[0].attn.num_heads == 16 and model.blocks[0].attn.head_dim == 72
    assert model.out_channels == 8


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_published_sizes(name):
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}[size]
    patch = int(patch)
    with torch.device("meta"):
        model = DiT(dit_config(name))
    assert len(model.blocks) == depth
    assert model.x_embedder.proj.weight.shape == (hidden, 4, patch, patch)
    assert all(b.attn.num_heads == heads for b in model.blocks)
    assert model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert model.final_layer.linear.weight.shape == (patch * patch * 8, hidden)


def test_fx_trace_is_bitwise_eager():
    model = init_random_(DiT(SMALL)).eval()
    traced = torch.fx.symbolic_trace(model)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 4, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        with torch.no_grad():
            eager = model(x, t, y)
            assert eager.shape == (batch, 8, 8, 8)
            assert torch.equal(traced(x, t, y), eager)


def test_pos_embed_is_fixed_2d_sincos():
    """Token n = row*g + col. The first half of the channels encodes the column, the second the row
    (the reference meshgrids w first); each half is [sin(pos*w_k), cos(pos*w_k)], w_k = 1e4^(-k/(D/4))."""
    D, g = 64, 4
    model = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=D, depth=1, num_heads=4))
    pe = model.pos_embed[0].double()
    q = D // 4

    def expected(row, col, ch):
        half, j = divmod(ch, D // 2)
        pos = col if half == 0 else row
        fn, k = (math.sin, j) if j < q else (math.cos, j - q)
        return fn(pos * 10000.0 ** (-k / q))

    for row, col, ch in [(0, 1, 0), (2, 3, 1), (1, 2, q + 3), (3, 0, D // 2), (1, 3, D // 2 + q + 5), (3, 3, D - 1)]:
        assert pe[row * g + col, ch].item() == pytest.approx(expected(row, col, ch), abs=1e-6)
    full = torch.tensor([[expected(n // g, n % g, c) for c in range(D)] for n in range(g * g)], dtype=torch.float64)
    torch.testing.assert_close(pe, full, atol=1e-6, rtol=0)
    assert not model.pos_embed.requires_grad


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 5.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert emb.shape == (3, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    for k in (0, 1, 77, 127):
        f = math.exp(-math.log(10000.0) * k / 128)
        assert emb[1, k].item() == pytest.approx(math.cos(5.0 * f), abs=1e-5)
        assert emb[1, 128 + k].item() == pytest.approx(math.sin(5.0 * f), abs=1e-5)


def test_init_random_leaves_no_zero_parameter():
    model = DiT(SMALL)
    pos = model.pos_embed.clone()
    init_random_(model)
    for name, p in model.named_parameters():
        assert p.abs().sum() > 0, name
    h = SMALL.hidden_size
    for block in model.blocks:
        w = block.adaLN_modulation[1].weight
        for gate in (2, 5):  # gate_msa, gate_mlp chunks
            assert (w[gate * h : (gate + 1) * h] != 0).all()
    assert torch.equal(model.pos_embed, pos)
    # deterministic in the seed
    assert torch.equal(init_random_(DiT(SMALL), seed=3).blocks[0].attn.qkv.weight,
                       init_random_(DiT(SMALL), seed=3).blocks[0].attn.qkv.weight)


def test_frequency_shift_divides_by_half_minus_shift():
    """frequency_shift=1 gives diffusers' Timesteps(downscale_freq_shift=1) frequencies, i/(half-1)."""
    t = torch.tensor([5.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256, frequency_shift=1)
    for k in (0, 1, 77, 127):
        f = math.exp(-math.log(10000.0) * k / 127)
        assert emb[0, k].item() == pytest.approx(math.cos(5.0 * f), abs=1e-5)
        assert emb[1, 128 + k].item() == pytest.approx(math.sin(999.0 * f), abs=1e-4)
    assert not torch.allclose(emb, TimestepEmbedder.timestep_embedding(t, 256), atol=1e-2)


def test_config_defaults_are_facebooks_dit():
    model = DiT(SMALL)
    assert SMALL.frequency_shift == 0 and model.t_embedder.frequency_shift == 0
    assert all(b.norm1.eps == b.norm2.eps == 1e-6 for b in model.blocks)
    assert model.final_layer.norm_final.eps == 1e-6


def test_frequency_shift_changes_the_function():
    """Same weights, frequency_shift 0 vs 1: outputs differ by ~1e-3, far more than the ~1e-7 that
    float32 rounding moves them (N(0, 0.02) weights damp the timestep's influence)."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([999, 17]), torch.tensor([1, 2])
    base = init_random_(DiT(SMALL)).eval()
    shifted = DiT(DiTConfig(**{**SMALL.to_dict(), "frequency_shift": 1})).eval()
    shifted.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert (shifted(x, t, y) - base(x, t, y)).abs().max() > 1e-4


def test_mlp_norm_eps_sets_only_the_pre_mlp_norm():
    model = DiT(DiTConfig(**{**SMALL.to_dict(), "mlp_norm_eps": 1e-5}))
    assert all(b.norm2.eps == 1e-5 and b.norm1.eps == 1e-6 for b in model.blocks)
    assert model.final_layer.norm_final.eps == 1e-6
