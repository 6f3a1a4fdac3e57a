"""The `graphcache` command line, run in-process through `graphcache.cli.main` (one subprocess
call checks the module entry point). A tiny hidden built-in model keeps every run fast."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import graphcache
from graphcache import io as gio
from graphcache.artifact import read_manifest
from graphcache.cli import main
from graphcache.models.builtin import resolve_model
from graphcache.models.dit import DiT, DiTConfig, init_random_

TINY = "builtin:dit-tiny-random"
STEPS = 5
ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `graphcache ARGV`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def png_chunks(path) -> dict[bytes, bytes]:
    """The chunks of a PNG file by tag (CRCs checked)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    return chunks


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphcache: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-fora"
    assert main(["optimize", TINY, "--method", "fora", "--steps", str(STEPS), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def noise_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("noise") / "noise.pt"
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    torch.save(noise, path)
    return path, noise


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["optimize"], ["sample"], ["schedule"], ["methods"], ["inspect"]])
def test_help_everywhere_with_examples(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "usage: graphcache" in out
    assert "examples:" in out


def test_module_entry_point_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "graphcache", "--help"], capture_output=True, text=True, env=env,
                       timeout=900)  # a hang guard: importing torch on a loaded 2-core machine can take minutes
    assert r.returncode == 0, r.stderr
    assert "usage: graphcache" in r.stdout
    for command in ("optimize", "sample", "schedule", "methods", "inspect"):
        assert command in r.stdout


def test_closed_stdout_stops_quietly():
    """`graphcache schedule | head -1`: the reader goes away; no error message, SIGPIPE's status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "graphcache", "schedule", "--method", "clusca"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=900)
    finally:
        os.close(write_end)
    assert r.returncode == 141
    assert r.stderr == ""


# ---------------------------------------------------------------------------------------------
# optimize -> artifact -> sample
# ---------------------------------------------------------------------------------------------


def test_optimize_writes_artifact(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.safetensors"]
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == "graphcache-artifact" and m["format_version"] == 1
    assert m["backend"] == "eager"
    assert m["method"] == "fora" and m["options"] == {"interval": 3, "level": 0} and m["num_steps"] == STEPS
    assert m["model"]["source"] == TINY
    assert m["model"]["config"]["hidden_size"] == 64 and m["model"]["config"]["depth"] == 2
    assert m["schedule"]["num_steps"] == STEPS and len(m["schedule"]["steps"]) == STEPS
    assert set(m["versions"]) == {"graphcache", "torch", "python"}
    assert m["created"]
    # no temp dirs left beside it
    assert [p.name for p in artifact.parent.iterdir()] == [artifact.name]


def test_optimize_prints_summary(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", TINY, "--method", "fora", "--set", "interval=2", "--steps", "4",
                         "-o", tmp_path / "a")
    assert code == 0, err
    assert "fora" in out and "interval=2" in out
    assert "variants: 2" in out and "cache:" in out


def test_sample_artifact_equals_direct_and_python_api(capsys, tmp_path, artifact, noise_file):
    noise_path, noise = noise_file
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    code, out, err = run(capsys, "sample", artifact, "--labels", "1,2", "-o", a)
    assert code == 0, err
    assert "wrote" in out
    x = torch.load(a, weights_only=True)
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32

    code, _, err = run(capsys, "sample", TINY, "--method", "fora", "--steps", STEPS, "--labels", "1,2", "-q",
                       "-o", b)
    assert code == 0, err
    assert torch.equal(torch.load(b, weights_only=True), x)  # bitwise: same weights, same graphs

    # --noise: the file's noise is used, exactly as the Python API uses it
    code, _, err = run(capsys, "sample", artifact, "--labels", "1,2", "--noise", noise_path, "-q", "-o", c)
    assert code == 0, err
    from_cli = torch.load(c, weights_only=True)
    cached = graphcache.optimize(resolve_model(TINY), "fora", STEPS)
    expected = graphcache.sample(cached, [1, 2], noise=noise, seed=0, num_steps=STEPS)
    assert torch.equal(from_cli, expected)
    assert not torch.equal(from_cli, x)


def test_sample_options_reach_the_sampler(capsys, tmp_path):
    out = tmp_path / "x.pt"
    code, _, err = run(capsys, "sample", TINY, "--labels", "3", "--steps", "3", "--sampler", "ddpm",
                       "--cfg-scale", "1", "--guidance", "eps", "--seed", "7", "-q", "-o", out)
    assert code == 0, err
    uncached = graphcache.optimize(resolve_model(TINY), "none", 3)  # the CLI's default method
    expected = graphcache.sample(uncached, [3], seed=7, num_steps=3, sampler="ddpm", cfg_scale=1.0, guidance="eps")
    assert torch.equal(torch.load(out, weights_only=True), expected)


def test_sample_without_hoisting_is_the_plain_model_bit_for_bit(capsys, tmp_path):
    out = tmp_path / "x.pt"
    code, _, err = run(capsys, "sample", TINY, "--labels", "3,5", "--steps", "4", "--no-hoist-conditioning",
                       "-q", "-o", out)
    assert code == 0, err
    assert torch.equal(torch.load(out, weights_only=True), graphcache.sample(resolve_model(TINY), [3, 5], num_steps=4))
    for flags, hoisted in (([], True), (["--no-hoist-conditioning"], False)):
        art = tmp_path / f"art{hoisted}"
        assert run(capsys, "optimize", TINY, "--method", "fora", "--steps", "4", *flags, "-o", art)[0] == 0
        assert read_manifest(art)["hoist_conditioning"] is hoisted


def test_sample_png_for_pixel_model(capsys, tmp_path):
    model = init_random_(DiT(DiTConfig(input_size=8, in_channels=1, hidden_size=64, depth=1, num_heads=4,
                                       num_classes=10)), seed=1)
    ckpt = gio.save_model(model, tmp_path / "pix.safetensors")
    png = tmp_path / "grid.png"
    code, _, err = run(capsys, "sample", ckpt, "--labels", "0,1,2", "--steps", "2", "-q", "-o", png)
    assert code == 0, err
    chunks = png_chunks(png)
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    # 3 images of 8x8 in a 2x2 grid with 2-pixel padding, grayscale
    assert (w, h, depth, color) == (2 + 2 * 10, 2 + 2 * 10, 8, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + w)


# ---------------------------------------------------------------------------------------------
# schedule, methods, inspect
# ---------------------------------------------------------------------------------------------


def test_schedule_json_defaults_to_dit_xl(capsys):
    code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "50", "--json")
    assert code == 0, err
    obj = json.loads(out)  # exactly one JSON object
    assert obj["method"] == "fora" and obj["num_steps"] == 50 and obj["depth"] == 28
    assert obj["options"] == {"interval": 3, "level": 0}
    assert len(obj["steps"]) == 50 and all(len(s["kinds"]) == 28 for s in obj["steps"])
    if "flops" in obj:
        assert isinstance(obj["flops"], dict)


def test_schedule_fora_full_steps(capsys):
    code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "20", "--depth", "4", "--json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert [s["index"] for s in steps] == list(range(20))
    assert all(len(s["kinds"]) == 4 for s in steps)
    full = [s["step"] for s in steps if s["kinds"] == ["full"] * 4]
    expected = [s["step"] for s in steps if s["index"] == 0 or s["step"] % 3 == 0]
    assert full == expected and full[0] == 19
    assert all(s["kinds"] == ["reuse"] * 4 for s in steps if s["step"] not in full)


def test_schedule_model_depth_and_human_table(capsys):
    code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "6", "--model", TINY, "--json")
    assert code == 0, err
    assert json.loads(out)["depth"] == 2
    code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "6", "--depth", "3")
    assert code == 0, err
    lines = out.splitlines()
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 6
    assert "full×3" in rows[0] and "reuse×3" in rows[1]


def test_methods_json(capsys):
    code, out, err = run(capsys, "methods", "--json")
    assert code == 0, err
    methods = {m["name"]: m for m in json.loads(out)["methods"]}
    assert set(graphcache.methods.METHODS) == set(methods)
    interval = next(o for o in methods["fora"]["options"] if o["name"] == "interval")
    assert interval["default"] == 3 and interval["help"]
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "fora" in out and "interval=3" in out


def test_inspect_prints_blocks_and_passes(capsys):
    code, out, err = run(capsys, "inspect", TINY, "--method", "fora", "--steps", STEPS)
    assert code == 0, err
    assert "block 0" in out and "block 1" in out
    assert "attention" in out and "mlp" in out and "cut at" in out
    assert "InsertCacheWritePass" in out and "cache_write=4" in out
    code, out, err = run(capsys, "inspect", TINY, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["method"] == "none" and len(info["blocks"]) == 2


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------------


def test_error_unknown_method(capsys, tmp_path):
    code, _, err = run(capsys, "sample", TINY, "--method", "nope", "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "unknown method 'nope'", "fora")


def test_error_unknown_option(capsys):
    code, _, err = run(capsys, "schedule", "--method", "fora", "--set", "nope=1")
    assert_one_line_error(code, err, "no option 'nope'", "interval")


def test_error_bad_option_value(capsys, tmp_path):
    code, _, err = run(capsys, "optimize", TINY, "--method", "fora", "--set", "interval=x", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "interval")
    assert not (tmp_path / "o").exists()


def test_error_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "sample", tmp_path / "missing.pt", "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "not found", "missing.pt")


def test_error_missing_noise_file(capsys, tmp_path):
    code, _, err = run(capsys, "sample", TINY, "--labels", "1", "--noise", tmp_path / "n.pt", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "noise file not found")


def test_error_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    code, _, err = run(capsys, "inspect", bad)
    assert_one_line_error(code, err, "bad.pt")


def test_error_png_for_latent_model(capsys, tmp_path):
    code, _, err = run(capsys, "sample", TINY, "--labels", "1", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "latents", ".pt")
    assert not (tmp_path / "x.png").exists()


def test_error_unknown_output_suffix(capsys, tmp_path):
    code, _, err = run(capsys, "sample", TINY, "--labels", "1", "-o", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".pt", ".png")


def test_error_conflicting_method_or_steps_with_artifact(capsys, tmp_path, artifact):
    code, _, err = run(capsys, "sample", artifact, "--method", "none", "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "fora", "--method none")
    code, _, err = run(capsys, "sample", artifact, "--steps", "7", "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "--steps 7")
    code, _, err = run(capsys, "sample", artifact, "--set", "interval=2", "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "interval=2")
    # the same values as the artifact's are not a conflict
    code, _, err = run(capsys, "sample", artifact, "--method", "fora", "--steps", STEPS, "--set", "interval=3",
                       "--labels", "1", "-q", "-o", tmp_path / "x.pt")
    assert code == 0, err


@pytest.mark.parametrize("argv, needle", [
    (["sample", TINY, "--labels", "a,b", "-o", "x.pt"], "--labels"),
    (["sample", TINY, "--labels", "1"], "-o"),
    (["schedule", "--method", "fora", "--set", "interval"], "key=value"),
    (["schedule", "--method", "fora", "--steps", "0"], "--steps"),
    (["schedule", "--method", "fora", "--depth", "4", "--model", TINY], "not allowed"),
    (["sample", TINY, "--labels", "1", "--sampler", "euler", "-o", "x.pt"], "euler"),
    (["frobnicate"], "frobnicate"),
    ([], "command"),
])
def test_error_bad_arguments(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_error_label_out_of_range(capsys, tmp_path):
    code, _, err = run(capsys, "sample", TINY, "--labels", "10", "--steps", "2", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "out of range")


def test_debug_env_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("GRAPHCACHE_DEBUG", "1")
    code, _, err = run(capsys, "schedule", "--method", "nope")
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("graphcache: error: ")


# ---------------------------------------------------------------------------------------------
# atomic artifacts
# ---------------------------------------------------------------------------------------------


def _failing_save(model, path):
    Path(path).write_bytes(b"half a file")
    raise OSError(28, "No space left on device")


def test_failed_optimize_leaves_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(gio, "save_model", _failing_save)
    out = tmp_path / "out"
    code, _, err = run(capsys, "optimize", TINY, "--method", "fora", "--steps", "3", "-o", out)
    assert code != 0
    assert "No space left" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no OUT, no temp dir


def test_failed_optimize_keeps_existing_artifact(capsys, tmp_path, monkeypatch, artifact):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(gio, "save_model", _failing_save)
    code, _, _ = run(capsys, "optimize", TINY, "--method", "none", "--steps", "3", "-o", out)
    assert code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_optimize_replaces_existing_artifact(capsys, tmp_path, artifact):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(artifact, out)
    code, _, err = run(capsys, "optimize", TINY, "--method", "none", "--steps", "3", "-o", out)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["method"] == "none"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_optimize_refuses_to_replace_other_directories(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "optimize", TINY, "--method", "none", "--steps", "3", "-o", out)
    assert_one_line_error(code, err, "not a graphcache artifact")
    assert (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# diffusers model and pipeline folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_dirs(tmp_path_factory):
    """DiT model and pipeline folders, a PixArt-α pipeline folder and prompt embeddings for it (5
    tokens of 24)."""
    from safetensors.torch import save_file

    from diffusers_models import dit_pipeline, pixart_pipeline

    root = tmp_path_factory.mktemp("diffusers")
    pipe = dit_pipeline()
    pipe.save_pretrained(root / "dit-pipeline")
    pipe.transformer.save_pretrained(root / "dit")
    pixart_pipeline().save_pretrained(root / "pixart")
    g = torch.Generator().manual_seed(1)
    save_file({"prompt_embeds": torch.randn(1, 5, 24, generator=g), "prompt_attention_mask": torch.ones(1, 5)},
              root / "prompt.safetensors")
    save_file({"prompt_embeds": torch.randn(1, 5, 24, generator=g)}, root / "negative.safetensors")
    return root


@pytest.mark.parametrize("folder, kinds", [("dit", ["attention", "mlp"]),
                                           ("pixart", ["attention", "cross_attention", "mlp"])])
def test_inspect_diffusers_folder(capsys, diffusers_dirs, folder, kinds):
    code, out, err = run(capsys, "inspect", diffusers_dirs / folder, "--method", "fora", "--steps", "4",
                         "--text-tokens", "5")
    assert code == 0, err
    assert "2 blocks, 16 tokens, hidden 32" in out
    branches = [line.split()[0] for line in out.splitlines() if "transformer_blocks.0." in line]
    assert branches == kinds


def test_schedule_json_of_diffusers_folders_counts_flops(capsys, diffusers_dirs):
    code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "4", "--model", diffusers_dirs / "dit",
                         "--json")
    assert code == 0, err
    dit = json.loads(out)
    assert dit["depth"] == 2 and dit["flops"]["speedup"] > 1
    pixart = {}
    for tokens in ("5", "120"):
        code, out, err = run(capsys, "schedule", "--method", "fora", "--steps", "4", "--model",
                             diffusers_dirs / "pixart", "--text-tokens", tokens, "--json")
        assert code == 0, err
        pixart[tokens] = json.loads(out)
    assert pixart["5"]["steps"] == dit["steps"]
    assert 1 < pixart["5"]["flops"]["speedup"] and pixart["5"]["flops"]["uncached"] < pixart["120"]["flops"]["uncached"]


def test_bench_pixart_folder_samples_in_its_pipeline(capsys, diffusers_dirs, tmp_path):
    out = tmp_path / "bench.json"
    code, _, err = run(capsys, "bench", diffusers_dirs / "pixart", "--method", "fora", "--steps", "2",
                       "--text-tokens", "5", "--repeats", "1", "--warmup", "0", "--json", out, "-q")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert (report["steps"], report["batch"], report["cfg_scale"], report["text_tokens"]) == (2, 1, 4.5, 5)
    assert [r["method"] for r in report["results"]] == ["none", "fora"]
    code, _, err = run(capsys, "bench", diffusers_dirs / "pixart", "--method", "fora", "--sampler", "ddpm")
    assert_one_line_error(code, err, "does not apply")


@pytest.mark.parametrize("folder, cls", [("dit", "DiTTransformer2DModel"), ("pixart", "PixArtTransformer2DModel")])
def test_optimize_diffusers_folder_writes_a_loadable_artifact(capsys, diffusers_dirs, tmp_path, folder, cls):
    out = tmp_path / "fora"
    code, text, err = run(capsys, "optimize", diffusers_dirs / folder, "--method", "fora", "--steps", "4",
                          "-o", out)
    assert code == 0, err
    assert "wrote" in text and "transformer/" in text
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]
    manifest = read_manifest(out)
    assert manifest["model"] == {"source": str(diffusers_dirs / folder), "diffusers_class": cls}
    code, text, err = run(capsys, "inspect", out, "--json")
    assert code == 0, err
    assert json.loads(text)["method"] == "fora"
    code, _, err = run(capsys, "sample", out, "--labels", "1", "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, f"holds a diffusers {cls}", "PIPELINE_DIR")


def test_sample_refuses_a_flux_pipeline_folder(capsys, tmp_path):
    from diffusers_models import flux_pipeline

    flux_pipeline().save_pretrained(tmp_path / "flux")
    code, _, err = run(capsys, "sample", tmp_path / "flux", "--method", "fora", "-o", tmp_path / "out.png")
    assert_one_line_error(code, err, "graphcache sample runs DiT and PixArt-α pipeline folders; run a FluxPipeline")


def test_sample_pixart_pipeline_folder_writes_png(capsys, diffusers_dirs, tmp_path):
    png = tmp_path / "out" / "pixart.png"
    code, out, err = run(capsys, "sample", diffusers_dirs / "pixart", "--prompt-embeds",
                         diffusers_dirs / "prompt.safetensors", "--negative-embeds",
                         diffusers_dirs / "negative.safetensors", "--method", "fora", "--steps", "4", "--seed", "1",
                         "-o", png)
    assert code == 0, err
    assert "wrote" in out and "interval=3" in out
    w, h, depth, color = struct.unpack(">IIBB", png_chunks(png)[b"IHDR"][:10])
    assert (w, h, depth, color) == (2 + 16 + 2, 2 + 16 + 2, 8, 2)  # one 16x16 RGB image, padded
    assert [p.name for p in png.parent.iterdir()] == ["pixart.png"]


def test_sample_dit_pipeline_folder_with_labels(capsys, diffusers_dirs, tmp_path):
    out = tmp_path / "dit.pt"
    code, _, err = run(capsys, "sample", diffusers_dirs / "dit-pipeline", "--labels", "1,3", "--method", "toca",
                       "--steps", "4", "-q", "-o", out)
    assert code == 0, err
    x = torch.load(out, weights_only=True)
    assert x.shape == (2, 3, 16, 16) and -1 <= x.min() and x.max() <= 1  # decoded images, as a PNG grid takes them


def _broken_folder(root: Path, dit: Path, problem: str) -> Path:
    folder = root / problem
    folder.mkdir()
    if problem == "no-config":
        return folder
    config = json.loads((dit / "config.json").read_text())
    weights = (dit / "diffusion_pytorch_model.safetensors").read_bytes()
    if problem == "unsupported-class":
        config["_class_name"] = "UNet2DConditionModel"
    elif problem == "mismatched":
        config["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    if problem == "pickled-weights":
        from safetensors.torch import load_file

        torch.save(load_file(dit / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    else:
        cut = len(weights) // 2 if problem == "corrupt" else len(weights)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights[:cut])
    return folder


@pytest.mark.parametrize("problem, needle", [
    ("no-config", "has no config.json"),
    ("unsupported-class", "'UNet2DConditionModel' is not supported"),
    ("pickled-weights", "--allow-pickle"),
    ("corrupt", "not a readable safetensors file"),
    ("mismatched", "missing keys: transformer_blocks.2."),
])
def test_error_broken_diffusers_folder(capsys, diffusers_dirs, tmp_path, problem, needle):
    folder = _broken_folder(tmp_path, diffusers_dirs / "dit", problem)
    out = tmp_path / "art"
    code, _, err = run(capsys, "optimize", folder, "--method", "fora", "-o", out)
    assert_one_line_error(code, err, needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [problem]


def test_pickled_diffusers_weights_load_with_allow_pickle(capsys, diffusers_dirs, tmp_path):
    folder = _broken_folder(tmp_path, diffusers_dirs / "dit", "pickled-weights")
    code, out, err = run(capsys, "schedule", "--method", "fora", "--model", folder, "--allow-pickle")
    assert code == 0, err
    assert "depth 2, 16 tokens" in out


def test_error_pixart_sample_needs_embeddings(capsys, diffusers_dirs, tmp_path):
    png = tmp_path / "x.png"
    code, _, err = run(capsys, "sample", diffusers_dirs / "pixart", "--labels", "1", "-o", png)
    assert_one_line_error(code, err, "--prompt-embeds")
    code, _, err = run(capsys, "sample", diffusers_dirs / "pixart", "--prompt-embeds",
                       diffusers_dirs / "negative.safetensors", "--cfg-scale", "4", "-o", png)
    assert_one_line_error(code, err, "--negative-embeds")
    assert not png.exists()


def test_error_without_the_diffusers_extra(capsys, diffusers_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    code, _, err = run(capsys, "inspect", diffusers_dirs / "dit")
    assert_one_line_error(code, err, "graphcache[diffusers]")
