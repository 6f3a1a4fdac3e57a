"""Artifact directories: an optimized model on disk.

    OUT/
      manifest.json       what to rebuild: method, options, num_steps, model config, schedule, versions
      model.safetensors   the weights (config in the metadata; see graphcache.io.save_model)

or, for a diffusers transformer, transformer/ as `save_pretrained` writes it (config.json +
diffusion_pytorch_model.safetensors) instead of model.safetensors.

The "eager" and "compile" backends store no graphs: `load_artifact` loads the weights and runs
`graphcache.optimize` again with the recorded method, options, backend and `hoist_conditioning`
(for "compile" also the recorded `compile_options`: compiler, mode, dynamic, options;
torch.compile then compiles each variant on its first call), then checks that it yields the
recorded schedule.

The ahead-of-time backends ("aoti", "onnx", "tensorrt") store the exported variants instead:

    OUT/
      manifest.json       also: device, input shapes, batch range, cache slots, per-variant
                          signatures and token-count ranges, the step -> variant table, versions
      v<i>.pt2|.onnx      variant i's main graph (exporters/aoti.py, exporters/onnx.py), without
                          the weights
      weights.safetensors the weights, stored once: every .pt2 loads them at run time, every
                          ONNX file references them as external data
      v<i>_prologue.pt2   its random draws, v<i>_epilogue.pt2 its K-means (torch.export programs)
      step_inputs.safetensors  per-step tensor inputs (EOC's correction factors), when there are
                          any: the artifact runs without the prior file

and `load_artifact` runs them without the model's Python code (graphcache/aot_artifact.py), refusing an
artifact built by another torch release or for another device, and inputs outside its shapes.

`save_artifact` is atomic: the directory is built under a temporary name next to OUT and renamed
into place only when complete; an existing artifact at OUT is replaced only then, and a failure
leaves neither OUT nor the temporary directory behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import GraphcacheError
from .io import read_json_object
from .exporters.export import AHEAD_OF_TIME
from .models.dit import DiTConfig

FORMAT = "graphcache-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
DIFFUSERS_FOLDER = "transformer"

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "is_artifact", "load_artifact", "load_artifact_model",
           "read_manifest", "save_artifact"]


def is_artifact(path) -> bool:
    """True when `path` is a directory holding a manifest.json (complete or not)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def _versions() -> dict:
    from .version import __version__

    return {"graphcache": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _is_diffusers(model) -> bool:
    from .diffusers_models import TRANSFORMERS

    return type(model).__name__ in TRANSFORMERS


def _model_entry(model, model_spec: str, backend: str) -> dict:
    # a diffusers transformer's config is written beside its weights, in transformer/config.json;
    # ahead-of-time files run without the model's code, so any diffusers model is only named
    from_diffusers = type(model).__module__.split(".")[0] == "diffusers"
    if _is_diffusers(model) or (backend in AHEAD_OF_TIME and from_diffusers):
        return {"source": str(model_spec), "diffusers_class": type(model).__name__}
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise GraphcacheError(
            f"cannot save a {type(model).__name__} as an artifact: only graphcache DiT models (with a config) and "
            "diffusers DiT / PixArt-α transformers can be"
        )
    return {"source": str(model_spec), "config": config.to_dict()}


def build_manifest(cached_model, *, model_spec: str) -> dict:
    backend = getattr(cached_model, "backend", "eager")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "method": cached_model.method.name,
        "options": dict(cached_model.options),
        "num_steps": cached_model.num_steps,
        "model": _model_entry(cached_model.model, model_spec, backend),
        "schedule": cached_model.schedule.to_json(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if backend == "compile":
        from .exporters.compile import portable_options

        manifest["compile_options"] = portable_options(cached_model.compile_options)
    if backend not in AHEAD_OF_TIME:
        manifest["hoist_conditioning"] = cached_model.hoists_conditioning
    if backend in AHEAD_OF_TIME:
        from .aot_artifact import manifest_entries

        manifest.update(manifest_entries(cached_model, backend))
    return manifest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def save_artifact(cached_model, out_dir, *, model_spec: str) -> Path:
    """Write `cached_model` (a CachedModel) as an artifact directory at `out_dir`, atomically.

    An existing `out_dir` is replaced only if it is an artifact or an empty directory: graphcache
    never deletes a directory it did not write.
    """
    from .io import save_model

    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise GraphcacheError(f"cannot write the artifact to {out}: it exists and is not a directory")
        if not is_artifact(out) and any(out.iterdir()):
            raise GraphcacheError(
                f"cannot write the artifact to {out}: it is a non-empty directory that is not a graphcache "
                "artifact (refusing to replace it)"
            )
    manifest = build_manifest(cached_model, model_spec=model_spec)
    try:
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    except TypeError as e:
        raise GraphcacheError(f"cannot write the artifact manifest: {e}") from e

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{out.name}.tmp-{tag}"
    old = parent / f".{out.name}.old-{tag}"
    tmp.mkdir()
    try:
        if manifest["backend"] in AHEAD_OF_TIME:
            from .aot_artifact import copy_files

            copy_files(cached_model, manifest["backend"], tmp)
        elif _is_diffusers(cached_model.model):
            cached_model.model.save_pretrained(tmp / DIFFUSERS_FOLDER, safe_serialization=True)
        else:
            save_model(cached_model.model, tmp / WEIGHTS)
        (tmp / MANIFEST).write_text(text)  # written last: a manifest means the rest is there
        if out.exists():
            os.replace(out, old)  # a directory cannot be renamed onto a non-empty one
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


def read_manifest(path) -> dict:
    """The validated manifest of the artifact at `path` (GraphcacheError naming the problem)."""
    path = Path(path)
    if not path.exists():
        raise GraphcacheError(f"artifact not found: {path}")
    if not path.is_dir():
        raise GraphcacheError(f"{path} is not an artifact directory (it is a file)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise GraphcacheError(f"{path} is not a graphcache artifact: it has no {MANIFEST}")
    manifest = read_json_object(mpath)
    if manifest.get("format") != FORMAT:
        raise GraphcacheError(f"{mpath}: not a graphcache artifact manifest (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise GraphcacheError(
            f"{mpath}: artifact format_version {version!r} is not supported by this graphcache "
            f"(it reads version {FORMAT_VERSION}): re-create the artifact with `graphcache optimize`"
        )
    checks = {"method": str, "options": dict, "num_steps": int, "model": dict}
    for key, kind in checks.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise GraphcacheError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    from .exporters import BACKENDS

    backend = manifest.get("backend", "eager")
    if backend not in BACKENDS:
        raise GraphcacheError(
            f"{mpath}: backend {backend!r} is not supported here (this graphcache runs {', '.join(BACKENDS)})"
        )
    if not isinstance(manifest.get("compile_options", {}), dict):
        raise GraphcacheError(f"{mpath}: field 'compile_options' is not an object")
    return manifest


def load_artifact_model(path, manifest: dict | None = None, *, map_location="cpu"):
    """The model an eager or compile artifact holds: a graphcache DiT, or a diffusers transformer."""
    from .io import load_model

    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    if "diffusers_class" in manifest["model"]:
        from .diffusers_models import load_transformer

        return load_transformer(path / DIFFUSERS_FOLDER).to(map_location)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise GraphcacheError(f"{path}: the artifact has no {WEIGHTS} (incomplete or damaged)")
    model = load_model(weights, map_location=map_location)
    config = manifest["model"].get("config")
    # A manifest written before a DiTConfig field existed lacks it; like load_model, read it as the default.
    if isinstance(config, dict) and {**DiTConfig().to_dict(), **config} != model.config.to_dict():
        raise GraphcacheError(f"{path}: {WEIGHTS} does not match the model config recorded in {MANIFEST}")
    return model


def load_artifact(path, *, map_location="cpu", backend: str | None = None, compile_options: dict | None = None):
    """Rebuild the CachedModel saved at `path` by `save_artifact`, on the recorded backend (and
    compile options) unless `backend` / `compile_options` are given. An ahead-of-time artifact
    loads as an `ExportedModel` on `map_location` (default: the device it was built for)."""
    from .runtime import optimize

    path = Path(path)
    manifest = read_manifest(path)
    recorded_backend = manifest.get("backend", "eager")
    if recorded_backend in AHEAD_OF_TIME or backend in AHEAD_OF_TIME:
        if backend not in (None, recorded_backend):
            raise GraphcacheError(f"{path} was built for the {recorded_backend} backend; it cannot run on "
                                  f"{backend} (optimize the model again with --backend {backend})")
        if compile_options:
            raise GraphcacheError(f"{path}: compile options do not apply to a {recorded_backend} artifact")
        from .aot_artifact import ExportedModel

        model = ExportedModel(path, manifest, device=None if map_location == "cpu" else map_location)
        model.artifact_manifest = manifest
        return model
    model = load_artifact_model(path, manifest, map_location=map_location)
    kwargs = None
    if _is_diffusers(model):
        from .diffusers_models import example_kwargs

        kwargs = example_kwargs(model)  # another prompt length at run time captures again
    backend = recorded_backend if backend is None else backend
    if compile_options is None and backend == recorded_backend == "compile":
        compile_options = manifest.get("compile_options")
    try:
        cached = optimize(model, manifest["method"], manifest["num_steps"], backend=backend,
                          compile_options=compile_options,
                          hoist_conditioning=bool(manifest.get("hoist_conditioning", True)), kwargs=kwargs,
                          **manifest["options"])
    except GraphcacheError as e:
        raise GraphcacheError(f"{path}: cannot rebuild the artifact: {e}") from e
    recorded = manifest.get("schedule")
    if recorded is not None and json.loads(json.dumps(cached.schedule.to_json())) != recorded:
        made = manifest.get("versions", {}).get("graphcache", "?")
        raise GraphcacheError(
            f"{path}: method {manifest['method']} now builds a different schedule than the one recorded "
            f"(artifact made by graphcache {made}): re-create it with `graphcache optimize`"
        )
    cached.artifact_manifest = manifest
    return cached
