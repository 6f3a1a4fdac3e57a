"""graphcache.models.builtin: the builtin:NAME registry and resolve_model."""

from __future__ import annotations

import pytest
import torch

from graphcache.errors import GraphcacheError
from graphcache.io import save_model
from graphcache.models import builtin
from graphcache.models.builtin import BUILTINS, DEFAULT_MODEL, BuiltinModel, available, resolve_model
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_


def test_default_model_is_registered():
    assert DEFAULT_MODEL == "builtin:mnist-dit"
    assert DEFAULT_MODEL in [m.spec for m in available()]


def test_dit_s2_random():
    model = resolve_model("builtin:dit-s2-random")
    assert isinstance(model, DiT) and not model.training
    assert model.config == dit_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (12, 384, 6)
    # every weight N(0, 0.02), adaLN gates included (not the zero init of the paper)
    w = model.blocks[3].adaLN_modulation[1].weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    reference = init_random_(DiT(model.config), seed=0)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_generated_weights_are_deterministic():
    a, b = resolve_model("builtin:dit-tiny-random"), resolve_model("builtin:dit-tiny-random")
    assert a is not b
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hidden_entries_work_but_are_not_listed():
    tiny = resolve_model("builtin:dit-tiny-random")
    assert (tiny.config.hidden_size, tiny.config.depth, tiny.config.num_heads) == (64, 2, 4)
    assert (tiny.config.input_size, tiny.config.num_classes) == (8, 10)
    assert "builtin:dit-tiny-random" not in [m.spec for m in available()]
    assert "builtin:dit-tiny-random" in [m.spec for m in available(include_hidden=True)]


def test_unknown_builtin_lists_available():
    with pytest.raises(GraphcacheError) as e:
        resolve_model("builtin:nope")
    msg = str(e.value)
    assert "builtin:nope" in msg and "builtin:dit-s2-random" in msg
    assert "dit-tiny-random" not in msg


def test_num_heads_only_for_files():
    assert resolve_model("builtin:dit-tiny-random", num_heads=4).config.num_heads == 4
    with pytest.raises(GraphcacheError, match="num_heads"):
        resolve_model("builtin:dit-tiny-random", num_heads=2)


def test_paths_go_through_io(tmp_path):
    config = DiTConfig(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    model = init_random_(DiT(config), seed=3)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = resolve_model(str(path))
    assert loaded.config == config
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)
    with pytest.raises(GraphcacheError, match="not found"):
        resolve_model(str(tmp_path / "missing.pt"))


def test_shipped_weights_entry(tmp_path, monkeypatch):
    """An entry can be a safetensors file in graphcache/weights/ (here: a stand-in package dir)."""
    config = DiTConfig(input_size=8, in_channels=1, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    model = init_random_(DiT(config), seed=5)
    (tmp_path / "weights").mkdir()
    save_model(model, tmp_path / "weights" / "tiny.safetensors")
    monkeypatch.setattr(builtin.resources, "files", lambda package: tmp_path)
    monkeypatch.setitem(BUILTINS, "shipped", BuiltinModel("shipped", "a shipped file", weights="tiny.safetensors"))
    monkeypatch.setitem(BUILTINS, "absent", BuiltinModel("absent", "not installed", weights="absent.safetensors"))
    loaded = resolve_model("builtin:shipped")
    assert loaded.config == config
    assert torch.equal(loaded.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(GraphcacheError, match="not part of this installation"):
        resolve_model("builtin:absent")


def test_generated_entries_other_than_dit(monkeypatch):
    # builtin:pixart-xl2-256-random is made by a function (a diffusers model), like this one
    assert "builtin:pixart-xl2-256-random" in [m.spec for m in available()]
    made = []
    monkeypatch.setitem(BUILTINS, "made", BuiltinModel("made", "made", seed=7,
                                                       make=lambda seed: made.append(seed) or torch.nn.Linear(2, 2)))
    assert isinstance(resolve_model("builtin:made"), torch.nn.Linear) and made == [7]
