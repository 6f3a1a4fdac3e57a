"""EOC's prior (Qiu et al., arXiv 2501.19243): what uncached runs say about each branch's trend,
extracted once per model, sampler and step count (graphcache/calibration.py), and turned into
per-step correction factors.

The correction, as the authors first coded it: on a cached step t a branch's reused ungated output
becomes `reuse * (1 + λ * (P[t] - P[t-1]))` before the adaLN gate, P[t] being the branch's
ungated output at step t averaged over uncached calibration runs (steps counted from 0 in sampling
order). The corrected output is what the next cached step reuses, so over consecutive cached
steps the factors multiply: at step t, with the branch last computed at step t0, the cached value
is multiplied by Π_{t0 < s <= t} (1 + λ_s · D_s), D_s = P[s] - P[s-1]. `step_factors` computes
that product on the host, so the graph does one multiplication per cached branch
(passes/error_correction.py) and the cache keeps the computed value.

The prior file (safetensors, fp32) holds only what the factors read:

* `trend.{branch}`: D_s for s = 1 .. num_steps-1, shape (num_steps-1, tokens, channels), the
  batch rows (the guidance halves included) averaged;
* `gain.{branch}`, `norm.{branch}`: per step s, over held-out uncached runs (samples disjoint
  from the calibration set), b_s = Σ <F_s - F_{s-1}, F_{s-1}·D_s> and c_s = Σ |F_{s-1}·D_s|²,
  F the branch output. One step's squared error after the correction with weight λ is
  |F_s - F_{s-1}|² - 2λ b_s + λ² c_s: the correction helps exactly where 0 < λ < 2 b_s / c_s,
  and the least-squares weight is b_s / c_s. The judgment (methods/base.py) reads these.

Its metadata holds the model fingerprint, sampler, step count, guidance scale, tokens and
channels; a prior used with another model, step count or resolution is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .errors import GraphcacheError
from .io import atomic_write

FORMAT = "graphcache-eoc-prior/1"
METADATA_KEY = "graphcache_eoc"
JUDGMENTS = ("held-out", "all")
FITS = ("fit", "signed-fit")  # eoc_lambda values that fit λ per step and branch


def fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and values: the prior's model identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class Prior:
    meta: dict
    trend: dict[str, torch.Tensor]  # branch -> (num_steps-1, N, C)
    gain: dict[str, torch.Tensor]  # branch -> (num_steps-1,) sums b_s
    norm: dict[str, torch.Tensor]  # branch -> (num_steps-1,) c_s

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for br in self.trend:
            tensors[f"trend.{br}"] = self.trend[br].float().contiguous()
            tensors[f"gain.{br}"] = self.gain[br].float().contiguous()
            tensors[f"norm.{br}"] = self.norm[br].float().contiguous()
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(self.meta)}))
        return path

    def check(self, *, num_steps: int, num_tokens: int, hidden_size: int, branches) -> None:
        """GraphcacheError naming the first thing that differs from what the prior was made for
        (the model's weights: runtime.check_prior_model)."""
        m, src = self.meta, self.meta.get("source", "the prior")
        if num_steps != m["num_steps"]:
            raise GraphcacheError(f"{src} was calibrated for {m['num_steps']} sampling steps, not {num_steps}: "
                                  f"calibrate again with --steps {num_steps}")
        if (num_tokens, hidden_size) != (m["num_tokens"], m["hidden_size"]):
            raise GraphcacheError(f"{src} was calibrated at {m['num_tokens']} tokens x {m['hidden_size']} channels, "
                                  f"this model runs {num_tokens} x {hidden_size}: calibrate at this resolution")
        missing = sorted(set(branches) - set(self.trend))
        if missing:
            raise GraphcacheError(f"{src} has no trend for branch {missing[0]}: it was calibrated on another model")


def load_prior(path) -> Prior:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise GraphcacheError(f"EOC prior {path}: {e.strerror}") from None
    return _load_prior(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)  # the schedule and the runtime both read it; keyed by mtime and size
def _load_prior(path: str, mtime_ns: int, size: int) -> Prior:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "null") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise GraphcacheError(f"EOC prior {path}: not a safetensors file ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GraphcacheError(f"EOC prior {path}: not made by `graphcache calibrate --method eoc`")
    meta["source"] = path
    split = {"trend": {}, "gain": {}, "norm": {}}
    for key, t in tensors.items():
        kind, _, branch = key.partition(".")
        if kind not in split:
            raise GraphcacheError(f"EOC prior {path}: unexpected tensor {key!r}")
        split[kind][branch] = t
    return Prior(meta, split["trend"], split["gain"], split["norm"])


# ---------------------------------------------------------------------------------------------
# From the prior to per-step factors
# ---------------------------------------------------------------------------------------------


def step_weights(prior: Prior, branch: str, lam, judgment: str) -> list[float]:
    """λ_s per step s (index 0 = step 0, never corrected): λ, or its least-squares fit b_s / c_s
    where positive ("fit") or of either sign ("signed-fit"), or 0 where the judgment ("held-out")
    finds that it does not lower the one-step error on the held-out runs."""
    b, c = prior.gain[branch].double(), prior.norm[branch].double()
    weights = [0.0]
    for s in range(len(b)):
        # "fit" keeps the authors' direction (λ >= 0): measured on FORA, negative fits lower the
        # branch error yet hurt the images; on forecasts (TaylorSeer, ClusCa) "signed-fit"'s negative
        # λ damps the extrapolation and helps (docs/benchmarks.md, 2026-12-04)
        if lam in FITS:
            fitted = float(b[s] / c[s]) if c[s] > 0 else 0.0
            w = max(fitted, 0.0) if lam == "fit" else fitted
        else:
            w = float(lam)
        # the error changes by w² c - 2 w b: it drops exactly for w strictly between 0 and 2b/c
        if judgment == "held-out" and not w * (w * float(c[s]) - 2 * float(b[s])) < 0:
            w = 0.0
        weights.append(w)
    return weights


def step_factors(prior: Prior, computed: list[set[int]], lam, judgment: str) -> list[dict[str, torch.Tensor]]:
    """Per step: {branch: the factor its cached read is multiplied by}, for the branches that are
    cached there (`computed[t]`: blocks that compute at step t) and whose factor is not 1.

    The factor is the product of (1 + λ_s D_s) over the cached steps since the branch was last
    computed, the steps the judgment rejects contributing 1: what writing each corrected output
    back to the cache (the authors' code) gives, up to the rounding of the product."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in computed]
    for branch, trend in prior.trend.items():
        block = prior.meta["branches"][branch]
        weights = step_weights(prior, branch, lam, judgment)
        factor = None
        for t, blocks in enumerate(computed):
            if block in blocks or t == 0:
                factor = None
                continue
            if weights[t]:
                step = 1 + weights[t] * trend[t - 1]
                factor = step if factor is None else factor * step
            if factor is not None:
                out[t][branch] = factor
    return out
