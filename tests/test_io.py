"""graphcache.io: loading facebookresearch/DiT checkpoints, config inference, saving, and errors."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from graphcache.errors import GraphcacheError
from graphcache.io import load_model, load_state_dict_file, save_model
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_

# (id, config, num_heads to pass to load_model)
CASES = [
    # Published widths and heads (head count inferred from the width), fewer blocks to stay fast.
    ("S2", dit_config("DiT-S/2", input_size=16, depth=3), None),
    ("B4", dit_config("DiT-B/4", input_size=16, depth=2), None),
    # hidden 128 would infer 2 heads (hidden/64): the explicit option must win.
    ("custom", DiTConfig(input_size=8, hidden_size=128, depth=3, num_heads=4), 4),
]
SMALL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=3, num_heads=2, num_classes=10)


def _model(config, seed=0):
    return init_random_(DiT(config), seed=seed).eval()


def _inputs(config, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    return x, t, y


def _assert_same(loaded, original):
    assert isinstance(loaded, DiT)
    assert not loaded.training
    assert loaded.config == original.config
    x, t, y = _inputs(original.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), original(x, t, y))


def _write(kind, model, path):
    sd = model.state_dict()
    if kind == "pt":
        torch.save(sd, path)
    elif kind == "ema":
        torch.save({"ema": sd}, path)
    elif kind == "model":
        torch.save({"model": sd}, path)
    elif kind == "safetensors":  # raw file with no graphcache metadata: shapes alone
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        raise AssertionError(kind)


def _err(path, **kwargs) -> str:
    with pytest.raises(GraphcacheError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, config, heads = request.param
    return _model(config), heads


@pytest.fixture(scope="module")
def small():
    return _model(SMALL)


@pytest.fixture
def small_sd(small):
    return {k: v.clone() for k, v in small.state_dict().items()}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["pt", "ema", "model", "safetensors"])
def test_round_trip(case, kind, tmp_path):
    model, heads = case
    path = tmp_path / f"ckpt.{'safetensors' if kind == 'safetensors' else 'pt'}"
    _write(kind, model, path)
    _assert_same(load_model(path, num_heads=heads), model)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_model_round_trip(case, suffix, tmp_path):
    model, heads = case
    path = save_model(model, tmp_path / f"out{suffix}")
    assert os.listdir(tmp_path) == [path.name]  # the temp file was renamed away
    # safetensors carries its config, so heads need not be passed again
    loaded = load_model(path) if suffix == ".safetensors" else load_model(path, num_heads=heads)
    _assert_same(loaded, model)


def test_safetensors_metadata(small, tmp_path):
    path = save_model(small, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["graphcache_config"]) == SMALL.to_dict()


def test_safetensors_metadata_shapes_still_checked(small, tmp_path):
    path = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in small.state_dict().items()}
    lie = json.dumps({**SMALL.to_dict(), "depth": 4})
    save_file(sd, str(path), metadata={"graphcache_config": lie})
    assert "missing keys: blocks.3." in _err(path)


def test_train_checkpoint_prefers_ema(small, tmp_path):
    other = _model(SMALL, seed=7)
    path = tmp_path / "0100000.pt"
    torch.save(
        {
            "model": other.state_dict(),
            "ema": small.state_dict(),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256, results_dir="results"),
        },
        path,
    )
    _assert_same(load_model(path), small)
    assert torch.equal(load_state_dict_file(path)["pos_embed"], small.pos_embed)


def test_load_state_dict_file(small, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": small.state_dict()}, path)
    sd = load_state_dict_file(path)
    assert list(sd) == list(small.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in small.state_dict().items())


def test_config_overrides(small, tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small.state_dict(), path)
    loaded = load_model(path, class_dropout_prob=0.0, num_classes=11)
    assert loaded.config.class_dropout_prob == 0.0 and loaded.config.num_classes == 11
    # an override that contradicts the weights is a shape error, not a silent change
    assert "pos_embed" in _err(path, input_size=16)
    assert "unknown DiT config option" in _err(path, bogus=1)


# ---------------------------------------------------------------- config inference


def test_infer_mnist_like(tmp_path):
    config = DiTConfig(
        input_size=16, patch_size=2, in_channels=1, num_classes=10, hidden_size=96, depth=2, num_heads=3
    )
    model = _model(config)
    path = tmp_path / "mnist.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, num_heads=3)
    assert loaded.config == config
    assert loaded.config.learn_sigma and loaded.out_channels == 2
    _assert_same(loaded, model)
    # hidden 96 is neither a published width nor a multiple of 64
    assert "num_heads" in _err(path)


def test_infer_no_learn_sigma_and_mlp_ratio(tmp_path):
    config = DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=64, depth=1, num_heads=1,
                       mlp_ratio=2.0, num_classes=5, learn_sigma=False)
    model = _model(config)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, num_heads=1)
    assert loaded.config == config
    _assert_same(loaded, model)


def test_published_heads_inferred(tmp_path):
    # XL width (1152 -> 16 heads, not 1152/64 = 18), tiny depth
    config = dit_config("DiT-XL/2", input_size=4, depth=1, num_classes=2)
    path = tmp_path / "xl.pt"
    torch.save(_model(config).state_dict(), path)
    assert load_model(path).config == config


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    msg = _err(tmp_path / "nope.pt")
    assert "not found" in msg and "nope.pt" in msg


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_garbage_bytes(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(os.urandom(4096))
    assert path.name in _err(path)
    path.write_bytes(b"")
    assert path.name in _err(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated(small, tmp_path, suffix):
    path = save_model(small, tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _err(path)


def test_not_a_dit(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    assert "no DiT weights" in _err(path)


def test_missing_required_key(small_sd, tmp_path):
    del small_sd["pos_embed"]
    path = tmp_path / "m.pt"
    torch.save(small_sd, path)
    msg = _err(path)
    assert "'pos_embed'" in msg and "m.pt" in msg


def test_missing_and_unexpected_keys(small_sd, tmp_path):
    del small_sd["t_embedder.mlp.2.bias"]
    small_sd["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.pt"
    torch.save(small_sd, path)
    msg = _err(path)
    assert "missing keys: t_embedder.mlp.2.bias" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg


def test_wrong_shape(small_sd, tmp_path):
    small_sd["blocks.1.attn.proj.weight"] = torch.zeros(128, 32)
    path = tmp_path / "m.pt"
    torch.save(small_sd, path)
    msg = _err(path)
    assert "shape mismatch" in msg and "blocks.1.attn.proj.weight [128, 32] vs [128, 128]" in msg


def test_non_square_pos_embed(small_sd, tmp_path):
    small_sd["pos_embed"] = small_sd["pos_embed"][:, :-1]
    path = tmp_path / "m.pt"
    torch.save(small_sd, path)
    assert "square" in _err(path)


def test_non_contiguous_blocks(small_sd, tmp_path):
    sd = {k: v for k, v in small_sd.items() if not k.startswith("blocks.1.")}
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    assert "contiguous" in _err(path)


def test_bad_output_channels(small_sd, tmp_path):
    small_sd["final_layer.linear.weight"] = torch.zeros(2 * 2 * 12, 128)
    small_sd["final_layer.linear.bias"] = torch.zeros(2 * 2 * 12)
    path = tmp_path / "m.pt"
    torch.save(small_sd, path)
    assert "output channels" in _err(path)


def test_pickled_module_needs_allow_pickle(small, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(small, path)
    msg = _err(path)
    assert "allow_pickle" in msg and "pickled" in msg and "whole.pt" in msg
    loaded = load_model(path, allow_pickle=True)
    _assert_same(loaded, small)


def test_pickled_foreign_module_uses_state_dict(small, tmp_path):
    # a module of another class whose parameter names are DiT's (like the reference DiT class)
    wrapper = nn.Module()
    for name, child in small.named_children():
        wrapper.add_module(name, child)
    wrapper.pos_embed = small.pos_embed
    path = tmp_path / "foreign.pt"
    torch.save(wrapper, path)
    assert "allow_pickle" in _err(path)
    _assert_same(load_model(path, allow_pickle=True), small)


def test_save_bad_suffix(small, tmp_path):
    with pytest.raises(GraphcacheError):
        save_model(small, tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []


def test_config_fields_added_later_default_when_metadata_lacks_them(small, tmp_path):
    """Files written before frequency_shift / mlp_norm_eps existed load as facebook's DiT."""
    path = tmp_path / "old.safetensors"
    old = {k: v for k, v in SMALL.to_dict().items() if k not in ("frequency_shift", "mlp_norm_eps")}
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path),
              metadata={"graphcache_config": json.dumps(old)})
    _assert_same(load_model(path), small)


def test_diffusers_variant_config_round_trips(tmp_path):
    config = DiTConfig(**{**SMALL.to_dict(), "frequency_shift": 1, "mlp_norm_eps": 1e-5})
    model = _model(config)
    _assert_same(load_model(save_model(model, tmp_path / "m.safetensors")), model)
    # a .pt file has no config: the fields are options, like num_heads
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _assert_same(load_model(tmp_path / "m.pt", frequency_shift=1, mlp_norm_eps=1e-5), model)
