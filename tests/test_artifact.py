"""graphcache.artifact: save/load round trip and every load error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import graphcache
from graphcache.artifact import FORMAT_VERSION, load_artifact, read_manifest, save_artifact
from graphcache.errors import GraphcacheError
from graphcache.models.builtin import resolve_model

TINY = "builtin:dit-tiny-random"
STEPS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cached = graphcache.optimize(resolve_model(TINY), "fora", STEPS, interval=2)
    out = save_artifact(cached, tmp_path_factory.mktemp("a") / "art", model_spec=TINY)
    return cached, out


@pytest.fixture
def copy(saved, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(saved[1], out)
    return out


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip(saved):
    cached, out = saved
    loaded = load_artifact(out)
    assert loaded.method.name == "fora" and loaded.options == {"interval": 2, "level": 0} and loaded.num_steps == STEPS
    assert loaded.schedule.to_json() == cached.schedule.to_json()
    assert loaded.model.config == cached.model.config
    a = graphcache.sample(cached, [1, 2], num_steps=STEPS)
    b = graphcache.sample(loaded, [1, 2], num_steps=STEPS)
    assert torch.equal(a, b)


def test_manifest_fields(saved):
    _, out = saved
    m = read_manifest(out)
    assert m["format"] == "graphcache-artifact" and m["format_version"] == FORMAT_VERSION
    assert m["backend"] == "eager" and m["model"]["source"] == TINY
    assert m["model"]["config"]["depth"] == 2
    assert m["schedule"]["method"] == "fora" and len(m["schedule"]["steps"]) == STEPS
    assert m["versions"]["torch"] == torch.__version__
    assert m["hoist_conditioning"] is True


def test_round_trip_keeps_the_conditioning_in_the_variants_when_asked(saved, tmp_path):
    cached, _ = saved
    plain = graphcache.optimize(cached.model, "fora", STEPS, hoist_conditioning=False, interval=2)
    out = tmp_path / "plain"
    save_artifact(plain, out, model_spec=TINY)
    assert read_manifest(out)["hoist_conditioning"] is False
    loaded = load_artifact(out)
    assert not loaded.hoists_conditioning and not loaded.conditionings
    assert torch.equal(graphcache.sample(loaded, [1], num_steps=STEPS), graphcache.sample(plain, [1], num_steps=STEPS))


def _load_error(path, *needles):
    with pytest.raises(GraphcacheError) as e:
        load_artifact(path)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_not_found(tmp_path):
    _load_error(tmp_path / "nothing", "not found")


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.pt"
    f.write_bytes(b"x")
    _load_error(f, "not an artifact directory")


def test_no_manifest(tmp_path):
    _load_error(tmp_path, "no manifest.json")


def test_bad_json(copy):
    (copy / "manifest.json").write_text("{not json")
    _load_error(copy, "not valid JSON")


def test_not_an_object(copy):
    (copy / "manifest.json").write_text("[1, 2]")
    _load_error(copy, "JSON object")


def test_wrong_format(copy):
    _edit_manifest(copy, format="something-else")
    _load_error(copy, "not a graphcache artifact")


def test_wrong_format_version(copy):
    _edit_manifest(copy, format_version=99)
    _load_error(copy, "format_version 99")


def test_missing_field(copy):
    m = json.loads((copy / "manifest.json").read_text())
    del m["num_steps"]
    (copy / "manifest.json").write_text(json.dumps(m))
    _load_error(copy, "num_steps")


def test_unsupported_backend(copy):
    _edit_manifest(copy, backend="tvm")
    _load_error(copy, "tvm")


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    _load_error(copy, "model.safetensors")


def test_corrupt_weights(copy):
    (copy / "model.safetensors").write_bytes(b"garbage")
    _load_error(copy, "model.safetensors")


def test_unknown_method(copy):
    _edit_manifest(copy, method="nope")
    _load_error(copy, "unknown method 'nope'")


def test_config_mismatch(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["model"]["config"]["depth"] = 5
    (copy / "manifest.json").write_text(json.dumps(m))
    _load_error(copy, "does not match")


def test_manifest_from_before_a_config_field_existed(copy):
    m = json.loads((copy / "manifest.json").read_text())
    del m["model"]["config"]["frequency_shift"], m["model"]["config"]["mlp_norm_eps"]
    (copy / "manifest.json").write_text(json.dumps(m))
    assert load_artifact(copy).model.config.frequency_shift == 0


def test_schedule_mismatch(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["schedule"]["steps"][2]["kinds"] = ["full", "full"]
    (copy / "manifest.json").write_text(json.dumps(m))
    _load_error(copy, "different schedule")


def test_save_refuses_file(saved, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(GraphcacheError, match="not a directory"):
        save_artifact(saved[0], f, model_spec=TINY)
    assert f.read_text() == "x"


def test_save_into_empty_directory(saved, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_artifact(saved[0], out, model_spec=TINY)
    assert read_manifest(out)["method"] == "fora"
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
