"""Loading and saving DiT checkpoints.

`load_model` reads a facebookresearch/DiT checkpoint (a plain state dict, a train.py checkpoint
holding "ema"/"model", or a .safetensors file), infers the DiTConfig from the tensor shapes and
returns a graphcache `DiT` in eval mode. Loading never executes code from the file unless the
caller passes ``allow_pickle=True``. `save_model` writes .safetensors or .pt files atomically.
Every failure the user can fix is a one-line `GraphcacheError` that names the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import GraphcacheError, exception_line
from .models.dit import DIT_CONFIGS, DiT, DiTConfig

__all__ = ["load_model", "save_model", "load_state_dict_file"]

CONFIG_METADATA_KEY = "graphcache_config"
_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys that shape inference reads, in the order they are checked.
_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
    "y_embedder.embedding_table.weight",
)
_DIT_PREFIXES = ("x_embedder.", "pos_embed", "t_embedder.", "y_embedder.", "blocks.", "final_layer.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
# Published head counts by hidden size (DiT-S/B/L/XL).
_PUBLISHED_HEADS = {c["hidden_size"]: c["num_heads"] for c in DIT_CONFIGS.values()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _few(items, n: int = 4) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _read(path: Path, allow_pickle: bool, map_location) -> tuple[object, dict]:
    """The object stored in `path` (and safetensors metadata, else {})."""
    if not path.exists():
        raise GraphcacheError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise GraphcacheError(f"checkpoint path is a directory, not a file: {path}")

    if path.suffix.lower() in _SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:
            raise GraphcacheError(
                f"{path}: not a readable safetensors file (corrupt or truncated?): {exception_line(e)}"
            ) from e

    try:
        # train.py checkpoints carry their argparse.Namespace; it only holds plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=not allow_pickle), {}
    except Exception as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if not allow_pickle and found:
            raise GraphcacheError(
                f"{path}: file contains pickled Python objects ({found.group(1)}), not just tensors; "
                "loading it executes code from the file, so pass allow_pickle=True "
                "(CLI: --allow-pickle) only if you trust its source"
            ) from e
        raise GraphcacheError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {exception_line(e)}"
        ) from e


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} state dict out of whatever the file held."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):  # train.py checkpoints: prefer the EMA weights
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                inner = obj[key]
                obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
                break
    if not isinstance(obj, Mapping):
        raise GraphcacheError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path, allow_pickle: bool = False, map_location="cpu") -> dict[str, torch.Tensor]:
    """The raw state dict in a checkpoint file, unwrapped from {"ema": ...} / {"model": ...}."""
    path = Path(path)
    obj, _ = _read(path, allow_pickle, map_location)
    return _unwrap(obj, path)


def _infer_config(sd: dict, path: Path, base: dict | None, num_heads, overrides: dict) -> DiTConfig:
    if not any(k.startswith(_DIT_PREFIXES) for k in sd):
        raise GraphcacheError(
            f"{path}: no DiT weights found (expected keys like 'x_embedder.proj.weight'; "
            f"found {_few(sorted(sd)) or 'no tensors'})"
        )
    for key in _REQUIRED_KEYS:
        if key not in sd:
            raise GraphcacheError(f"{path}: not a DiT checkpoint: expected key {key!r} is missing")

    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise GraphcacheError(f"unknown DiT config option(s): {', '.join(unknown)}")

    if base is not None:
        cfg = dict(base)
    else:
        proj = sd["x_embedder.proj.weight"]
        if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
            raise GraphcacheError(
                f"{path}: x_embedder.proj.weight has shape {_shape(proj)}, expected [hidden, in, p, p]"
            )
        hidden, in_ch, p = proj.shape[0], proj.shape[1], proj.shape[2]

        pos = sd["pos_embed"]
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden:
            raise GraphcacheError(f"{path}: pos_embed has shape {_shape(pos)}, expected [1, N, {hidden}]")
        n = pos.shape[1]
        grid = math.isqrt(n)
        if grid * grid != n:
            raise GraphcacheError(
                f"{path}: pos_embed has {n} tokens, not a square grid; only square inputs are supported"
            )

        depths = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})
        if depths != list(range(len(depths))):
            raise GraphcacheError(
                f"{path}: block indices are not contiguous from 0 (found {_few(map(str, depths), 8)})"
            )

        rows = sd["final_layer.linear.weight"].shape[0]
        if rows % (p * p):
            raise GraphcacheError(
                f"{path}: final_layer.linear.weight has {rows} rows, not a multiple of patch area {p * p}"
            )
        out_ch = rows // (p * p)
        if out_ch not in (in_ch, 2 * in_ch):
            raise GraphcacheError(
                f"{path}: {out_ch} output channels for {in_ch} input channels; "
                f"expected {in_ch} or {2 * in_ch} (learn_sigma)"
            )

        fc1 = sd["blocks.0.mlp.fc1.weight"].shape[0]
        mlp_ratio = fc1 / hidden
        if int(hidden * mlp_ratio) != fc1:
            raise GraphcacheError(f"{path}: MLP width {fc1} is not expressible as a ratio of {hidden}")

        cfg = dict(
            input_size=grid * p,
            patch_size=p,
            in_channels=in_ch,
            hidden_size=hidden,
            depth=len(depths),
            mlp_ratio=mlp_ratio,
            learn_sigma=out_ch == 2 * in_ch,
        )
        dropout = overrides.get("class_dropout_prob", DiTConfig.class_dropout_prob)
        table = sd["y_embedder.embedding_table.weight"].shape[0]
        cfg["num_classes"] = table - (1 if dropout > 0 else 0)

        if hidden in _PUBLISHED_HEADS:
            cfg["num_heads"] = _PUBLISHED_HEADS[hidden]
        elif hidden % 64 == 0:
            cfg["num_heads"] = hidden // 64
        elif num_heads is None:
            raise GraphcacheError(
                f"{path}: cannot infer the number of attention heads for hidden size {hidden}; "
                "pass num_heads (CLI: --num-heads)"
            )

    cfg.update(overrides)
    if num_heads is not None:
        cfg["num_heads"] = int(num_heads)
    try:
        return DiTConfig(**cfg)
    except TypeError as e:
        raise GraphcacheError(f"{path}: invalid DiT config: {exception_line(e)}") from e


def state_dict_problems(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `sd` from loading where `expected` (tensors or meta tensors) would: missing and
    unexpected keys, shape mismatches, each an abbreviated list; [] when none."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} {_shape(sd[k])} vs {_shape(v)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (checkpoint vs model): {_few(mismatched, 3)}")
    return problems


def _check_keys(model: DiT, sd: dict, path: Path, config: DiTConfig) -> None:
    problems = state_dict_problems(sd, model.state_dict())
    if problems:
        raise GraphcacheError(
            f"{path}: checkpoint does not match DiT(hidden={config.hidden_size}, depth={config.depth}, "
            f"patch={config.patch_size}, input={config.input_size}): " + "; ".join(problems)
        )


def load_model(path, *, num_heads=None, allow_pickle=False, map_location="cpu", **config_overrides) -> DiT:
    """Load a DiT checkpoint (.pt/.pth state dict, train.py {"ema"/"model"}, or .safetensors).

    The config is inferred from tensor shapes (a .safetensors "graphcache_config" entry is used
    when present); `num_heads` and `config_overrides` take precedence. Returns the model in eval mode.
    """
    path = Path(path)
    obj, metadata = _read(path, allow_pickle, map_location)
    if isinstance(obj, DiT):
        return obj.eval()
    sd = _unwrap(obj, path)

    base = None
    if CONFIG_METADATA_KEY in metadata:
        try:
            base = json.loads(metadata[CONFIG_METADATA_KEY])
            if not isinstance(base, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise GraphcacheError(f"{path}: invalid {CONFIG_METADATA_KEY} metadata: {exception_line(e)}") from e
    config = _infer_config(sd, path, base, num_heads, config_overrides)

    try:
        with torch.device("meta"):
            model = DiT(config)
    except GraphcacheError as e:
        raise GraphcacheError(f"{path}: {e}") from e
    _check_keys(model, sd, path, config)

    device = next(iter(sd.values())).device
    model.to_empty(device=device)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise GraphcacheError(f"{path}: cannot load weights: {exception_line(e)}") from e
    return model.eval()


def read_json_object(path: Path) -> dict:
    """The JSON object in the file `path` (a manifest, a config); GraphcacheError if it is not one."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GraphcacheError(f"{path}: not valid JSON ({exception_line(e)})") from e
    if not isinstance(obj, dict):
        raise GraphcacheError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) for a temp path in the same directory, then rename it onto `path`: readers
    never see a half-written file, and a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(model: nn.Module, path) -> Path:
    """Write `model`'s weights to `path` (.safetensors with the config as metadata, or a .pt state
    dict), atomically: a temp file in the same directory, then os.replace."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES:
        raise GraphcacheError(f"cannot save to {path}: use a .safetensors or .pt file name")
    sd = model.state_dict()

    def write(tmp: Path) -> None:
        if suffix in _SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            config = getattr(model, "config", None)
            metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())} if config is not None else None
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
        else:
            torch.save(sd, tmp)

    atomic_write(path, write)
    return path
