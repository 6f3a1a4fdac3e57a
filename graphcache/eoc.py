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

The prior file (safetensors, fp32) holds only what the factors read, for the steps s its
metadata lists (`steps`: every step from 1 on, or, calibrated `--for` a method, those where its
schedule leaves some branch uncomputed, the only ones a factor reads):

* `trend.{branch}`: D_s, shape (stored steps, tokens, channels), the batch rows (the guidance
  halves included) averaged;
* `gain.{branch}`, `norm.{branch}`: per stored step s, over held-out uncached runs (samples disjoint
  from the calibration set), b_s = Σ <F_s - F_{s-1}, F_{s-1}·D_s> and c_s = Σ |F_{s-1}·D_s|²,
  F the branch output. One step's squared error after the correction with weight λ is
  |F_s - F_{s-1}|² - 2λ b_s + λ² c_s: the correction helps exactly where 0 < λ < 2 b_s / c_s,
  and the least-squares weight is b_s / c_s. The judgment (methods/base.py) reads these.

Its metadata holds the model fingerprint, sampler, step count, guidance scale, tokens and
channels; a prior used with another model, step count or resolution is refused. A prior calibrated
through a diffusers pipeline names the pipeline and, as its sampler, the scheduler class, which
`graphcache.enable` checks too.
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
from .schedule import index_ranges

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
    trend: dict[str, torch.Tensor]  # branch -> (len(steps), N, C), row i for step steps[i]
    gain: dict[str, torch.Tensor]  # branch -> (len(steps),) sums b_s
    norm: dict[str, torch.Tensor]  # branch -> (len(steps),) c_s

    @property
    def steps(self) -> list[int]:
        """The steps whose trend and statistics the prior stores, in order."""
        return self.meta["steps"]

    def keep_steps(self, steps) -> Prior:
        """The prior restricted to `steps` (a subset of its own): what a schedule reads, when the
        whole prior would be large (DiT-XL/2, 20 steps: 1.3 GB)."""
        rows = {s: i for i, s in enumerate(self.steps)}
        keep = sorted(set(steps))
        missing = [s for s in keep if s not in rows]
        if missing:
            raise GraphcacheError(f"the prior does not store step {missing[0]}")
        index = torch.tensor([rows[s] for s in keep], dtype=torch.long)
        return Prior({**self.meta, "steps": keep}, {br: t[index] for br, t in self.trend.items()},
                     {br: t[index] for br, t in self.gain.items()}, {br: t[index] for br, t in self.norm.items()})

    def require_steps(self, steps, method: str) -> None:
        """GraphcacheError naming the steps of `steps` the prior lacks (made `--for` another schedule)."""
        missing = sorted(set(steps) - set(self.steps))
        if missing:
            made_for = self.meta.get("for") or {}
            given = " ".join(f"--set {k}={v}" for k, v in made_for.get("options", {}).items())
            raise GraphcacheError(
                f"{self.meta.get('source', 'the prior')} stores steps {index_ranges(self.steps)} only (calibrated "
                f"--for {made_for.get('method', '?')}{' ' + given if given else ''}); this {method} schedule also "
                f"reads step{'s' * (len(missing) > 1)} {index_ranges(missing)}: calibrate again with --for {method} "
                "and its --set options, or without --for (every step)")

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
    # priors written before these were recorded: every step, and each branch's kind from its name
    meta.setdefault("steps", list(range(1, meta["num_steps"])))
    meta.setdefault("kinds", {br: br.split("_", 1)[1].rstrip("0123456789") for br in meta["branches"]})
    return Prior(meta, split["trend"], split["gain"], split["norm"])


# ---------------------------------------------------------------------------------------------
# From the prior to per-step factors
# ---------------------------------------------------------------------------------------------


def step_weights(prior: Prior, branch: str, lam, judgment: str) -> dict[int, float]:
    """λ_s per stored step s: λ, or its least-squares fit b_s / c_s where positive ("fit") or of
    either sign ("signed-fit"), or 0 where the judgment ("held-out") finds that it does not lower
    the one-step error on the held-out runs."""
    b, c = prior.gain[branch].double(), prior.norm[branch].double()
    weights = {}
    for i, s in enumerate(prior.steps):
        # "fit" keeps the authors' direction (λ >= 0): measured on FORA, negative fits lower the
        # branch error yet hurt the images; on forecasts (TaylorSeer, ClusCa) "signed-fit"'s negative
        # λ damps the extrapolation and helps (docs/benchmarks.md, 2026-12-04)
        if lam in FITS:
            fitted = float(b[i] / c[i]) if c[i] > 0 else 0.0
            w = max(fitted, 0.0) if lam == "fit" else fitted
        else:
            w = float(lam)
        # the error changes by w² c - 2 w b: it drops exactly for w strictly between 0 and 2b/c
        if judgment == "held-out" and not w * (w * float(c[i]) - 2 * float(b[i])) < 0:
            w = 0.0
        weights[s] = w
    return weights


def steps_read(computed: list[set[str]], branches) -> list[int]:
    """The steps whose trend the factors read: those after the first where some branch of
    `branches` is not computed (`computed[t]`: the branches computed at step t)."""
    return [t for t in range(1, len(computed)) if any(br not in computed[t] for br in branches)]


def step_factors(prior: Prior, computed: list[set[str]], lam, judgment: str) -> list[dict[str, torch.Tensor]]:
    """Per step: {branch: the factor its cached read is multiplied by}, for the branches that are
    cached there (`computed[t]`: the branches computed at step t, fully or on some tokens) and
    whose factor is not 1. The prior must store every step `steps_read` names (Prior.require_steps).

    The factor is the product of (1 + λ_s D_s) over the cached steps since the branch was last
    computed, the steps the judgment rejects contributing 1: what writing each corrected output
    back to the cache (the authors' code) gives, up to the rounding of the product. A branch
    computed on some tokens starts over as a computed one does: its fresh tokens are that step's."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in computed]
    rows = {s: i for i, s in enumerate(prior.steps)}
    for branch, trend in prior.trend.items():
        weights = step_weights(prior, branch, lam, judgment)
        factor = None
        for t, branches in enumerate(computed):
            if branch in branches or t == 0:
                factor = None
                continue
            if weights[t]:
                step = 1 + weights[t] * trend[rows[t]]
                factor = step if factor is None else factor * step
            if factor is not None:
                out[t][branch] = factor
    return out
