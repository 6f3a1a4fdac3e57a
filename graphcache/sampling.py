"""DDIM / DDPM sampling for class-conditional DiTs, numerically matching the reference sampler.

The reference is the `diffusion/` package of facebookresearch/DiT (OpenAI's guided-diffusion):
linear betas (1e-4 .. 0.02 over 1000 steps, float64), "evenly spaced with rounding" respacing
(`create_diffusion(str(S))`), epsilon prediction with a LEARNED_RANGE variance, `clip_denoised=False`.
Everything that affects the result bit for bit is reproduced (facebookresearch/DiT
`diffusion/gaussian_diffusion.py`, `diffusion/respace.py`, `models.py` `forward_with_cfg`):

* the schedule is built in float64 NumPy; the respaced schedule is rebuilt from its own betas,
  `beta_i = 1 - acp[t_i] / acp[t_{i-1}]`, exactly as `SpacedDiffusion` does;
* a per-step coefficient is the float64 value at the step index, cast to float32, then used in
  float32 arithmetic in the reference's operation order;
* the loop runs i = S-1 .. 0 and calls the model with the ORIGINAL timestep `timestep_map[i]`;
* every step draws one `randn_like(x)` from the global torch RNG, DDIM (eta = 0) included, so the
  RNG stream (and a cached model drawing from it) stays in the reference's order;
* classifier-free guidance is one batched model call on `[cond; uncond]` (see `guided`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import GraphcacheError

NUM_TRAIN_STEPS = 1000
SAMPLERS = ("ddim", "ddpm")
GUIDANCE_MODES = ("official", "eps")

__all__ = [
    "Diffusion",
    "GUIDANCE_MODES",
    "NUM_TRAIN_STEPS",
    "SAMPLERS",
    "guided",
    "linear_betas",
    "sample",
    "space_timesteps",
]


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def linear_betas(num_train_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """The reference "linear" schedule, scaled so any step count spans the same noise range."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_train_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The kept original timesteps, as the reference `space_timesteps` (evenly spaced, rounded).

    `section_counts` is "S" (or "S1,S2,..." for equal-size sections, each spaced separately).
    Within a section of `size` steps, `count` steps are taken at round(k * (size-1)/(count-1)),
    with the index accumulated by repeated addition and Python's half-even `round`.
    """
    if isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise GraphcacheError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


class Diffusion:
    """The respaced schedule of `num_steps` sampling steps (float64 NumPy arrays, one per step).

    `timestep_map[i]` is the original timestep of sampling step i; `ddim_step` and `ddpm_step`
    turn a model output at step i into x_{i-1}. Steps are indexed by the respaced index i, given
    as an int or a (B,) long tensor.
    """

    def __init__(self, num_steps: int, num_train_steps: int = NUM_TRAIN_STEPS):
        base_acp = np.cumprod(1.0 - linear_betas(num_train_steps))
        kept = space_timesteps(num_train_steps, str(num_steps))
        betas, last = [], 1.0
        for t in sorted(kept):
            betas.append(1.0 - base_acp[t] / last)
            last = base_acp[t]
        self.num_steps = len(betas)
        self.timestep_map = np.array(sorted(kept), dtype=np.int64)

        b = np.array(betas, dtype=np.float64)
        acp = np.cumprod(1.0 - b)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = b
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        post_var = b * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_variance = post_var
        # posterior_variance[0] is 0; the reference clips the log by repeating entry 1. With a
        # single step the reference has no entry 1 (its array is empty and sampling fails); we use
        # beta_0 there. That variance only ever meets the masked-out noise of the t=0 step.
        first = post_var[1] if len(post_var) > 1 else b[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, post_var[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - b) / (1.0 - acp)
        self.log_betas = np.log(b)
        # Fixed "large" variance, used only for models without a learned variance.
        self.fixed_large_log_variance = np.log(np.append(first, b[1:]))
        # (id of one of the arrays above, device) -> that array on the device; the arrays are
        # never replaced, so their ids stay theirs
        self._device_arrays: dict[tuple[int, str], torch.Tensor] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _steps(self, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(x.device)
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    def _on_device(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """`arr` as a tensor on `device`, copied there once: a copy from host memory at every step
        would make a CUDA sampling loop wait for the GPU (a blocking copy synchronises the stream),
        so the host could never queue the next step's kernels ahead."""
        key = (id(arr), str(device))
        made = self._device_arrays.get(key)
        if made is None:
            made = self._device_arrays[key] = torch.from_numpy(arr).to(device)
        return made

    def _coef(self, arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] as float32, shaped (B, 1, ..., 1): the reference's float64 -> float32 cast."""
        out = self._on_device(arr, t.device)[t].float()
        return out.view(-1, *([1] * (ndim - 1)))

    def original_timesteps(self, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's timestep input: step indices mapped through `timestep_map` (long)."""
        t = self._steps(t, x)
        return self._on_device(self.timestep_map, t.device)[t]

    def predict(self, model_out: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor):
        """(pred_xstart, log_variance) from a model output (eps, then variance if learned)."""
        t = self._steps(t, x)
        c, nd = x.shape[1], x.ndim
        if model_out.shape[1] == 2 * c:
            eps, v = torch.split(model_out, c, dim=1)
            min_log = self._coef(self.posterior_log_variance_clipped, t, nd)
            max_log = self._coef(self.log_betas, t, nd)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        elif model_out.shape[1] == c:
            eps = model_out
            log_var = self._coef(self.fixed_large_log_variance, t, nd).expand_as(x)
        else:
            raise GraphcacheError(
                f"model output has {model_out.shape[1]} channels; expected {c} or {2 * c}"
            )
        pred_xstart = (
            self._coef(self.sqrt_recip_alphas_cumprod, t, nd) * x
            - self._coef(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps
        )
        return pred_xstart, log_var

    @staticmethod
    def _nonzero(t: torch.Tensor, ndim: int) -> torch.Tensor:
        return (t != 0).float().view(-1, *([1] * (ndim - 1)))

    # -- steps -----------------------------------------------------------------------------

    def ddim_step(self, model_out, x, t, eta: float = 0.0) -> torch.Tensor:
        """One DDIM step (reference `ddim_sample`); draws randn_like(x) even when eta is 0."""
        t = self._steps(t, x)
        nd = x.ndim
        pred_xstart, _ = self.predict(model_out, x, t)
        eps = (
            self._coef(self.sqrt_recip_alphas_cumprod, t, nd) * x - pred_xstart
        ) / self._coef(self.sqrt_recipm1_alphas_cumprod, t, nd)
        ab = self._coef(self.alphas_cumprod, t, nd)
        ab_prev = self._coef(self.alphas_cumprod_prev, t, nd)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        noise = torch.randn_like(x)
        mean = pred_xstart * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        return mean + self._nonzero(t, nd) * sigma * noise

    def ddpm_step(self, model_out, x, t) -> torch.Tensor:
        """One ancestral step (reference `p_sample`): posterior mean + masked learned noise."""
        t = self._steps(t, x)
        nd = x.ndim
        pred_xstart, log_var = self.predict(model_out, x, t)
        mean = (
            self._coef(self.posterior_mean_coef1, t, nd) * pred_xstart
            + self._coef(self.posterior_mean_coef2, t, nd) * x
        )
        noise = torch.randn_like(x)
        return mean + self._nonzero(t, nd) * torch.exp(0.5 * log_var) * noise


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


def guided(model: Callable, cfg_scale: float, guidance: str = "official") -> Callable:
    """`model` wrapped for classifier-free guidance on a `[cond; uncond]` batch of 2B rows.

    Like the official `forward_with_cfg`: the first half of x is duplicated, the model runs ONCE
    on the 2B rows (labels `[y; null]` are the caller's), and the guided eps
    `uncond + s * (cond - uncond)` replaces the guided channels in both halves.

    * ``guidance="official"`` (default) guides only output channels 0..2 — the reference's
      hard-coded ``out[:, :3]``. For a 4-channel latent, eps channel 3 and all the variance
      channels stay per-branch (cond rows keep the cond value, uncond rows the uncond value).
    * ``guidance="eps"`` guides exactly the first ``model.in_channels`` channels (all of eps);
      the variance channels stay per-branch.
    """
    if guidance not in GUIDANCE_MODES:
        raise GraphcacheError(
            f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE_MODES)}"
        )
    n_guided = 3 if guidance == "official" else int(model.in_channels)

    def forward(x, t, y):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :n_guided], out[:, n_guided:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    return forward


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _labels_tensor(labels, num_classes: int, device) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise GraphcacheError(f"labels must be integers, got a {labels.dtype} tensor")
        y = labels.reshape(-1).to(device=device, dtype=torch.long)
    else:
        try:
            values = [int(v) for v in labels]
        except (TypeError, ValueError):
            raise GraphcacheError("labels must be a list of ints or a long tensor") from None
        y = torch.tensor(values, dtype=torch.long, device=device)
    if y.numel() == 0:
        raise GraphcacheError("no labels given: need at least one class label to sample")
    bad = [int(v) for v in y.tolist() if not 0 <= v < num_classes]
    if bad:
        raise GraphcacheError(
            f"label(s) {bad[:5]} out of range: the model has classes 0..{num_classes - 1}"
        )
    return y


def _default_device(model, noise):
    if noise is not None:
        return noise.device
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _model_dtype(model) -> torch.dtype | None:
    """The floating dtype `model` takes its latents in (`input_dtype`, else its first floating
    parameter's), or None when it does not say (a plain callable)."""
    dtype = getattr(model, "input_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
    return None


class _InDtype:
    """`model` called on latents cast to `dtype` (a bf16 model, say), its output cast back to the
    latents' dtype: the sampler and the guidance arithmetic keep computing in the latents' dtype."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.in_channels = model.in_channels

    def __call__(self, x, t, y):
        return self.model(x.to(self.dtype), t, y).to(x.dtype)


def sample(
    model: Callable,
    labels,
    noise: torch.Tensor | None = None,
    seed: int | None = 0,
    num_steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float | None = 1.5,
    guidance: str = "official",
    progress: bool = False,
    device=None,
) -> torch.Tensor:
    """Sample latents (n, C, H, W) for `labels` with the reference DDIM (eta 0) or DDPM sampler.

    model: callable `model(x, t, y)` with `in_channels`, `input_size`, `learn_sigma`,
      `num_classes`; t are ORIGINAL timesteps. If it has `start_sampling(num_steps)`, that is
      called once before the loop (cached models reset there), then `announce_inputs` (if it
      has one) with every step's `(t, y)`, the tensors the loop will pass. The model is called
      exactly once per step (with CFG, once on the 2n-row batch).
    labels: class ids in [0, num_classes), a list of ints or a long tensor.
    noise: the initial latents (n, C, H, W); drawn with `torch.randn` after seeding if None.
      The sampler computes in the latents' dtype (float32 for drawn noise); a model of another
      dtype (bf16 weights, say) is called on the latents cast to its dtype, and its output is
      cast back before guidance and the sampler step.
    seed: `torch.manual_seed(seed)` on the GLOBAL RNG first, like the official scripts (every
      later draw — the initial noise, one `randn_like` per step — uses the global RNG too).
      None leaves the global RNG as it is.
    cfg_scale: classifier-free guidance scale; None or <= 1 samples without guidance (n rows).
      Above 1 the batch is [cond; uncond] with null class `num_classes`, and the cond half is
      returned. See `guided` for the two `guidance` modes ("official" 3-channel quirk, "eps").
    """
    if sampler not in SAMPLERS:
        raise GraphcacheError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if guidance not in GUIDANCE_MODES:
        raise GraphcacheError(f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE_MODES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise GraphcacheError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= NUM_TRAIN_STEPS:
        raise GraphcacheError(f"num_steps must be in 1..{NUM_TRAIN_STEPS}, got {num_steps}")
    num_steps = int(num_steps)
    for attr in ("in_channels", "input_size", "num_classes"):
        if not hasattr(model, attr):
            raise GraphcacheError(f"the model has no `{attr}` attribute; cannot sample from it")

    device = torch.device(device) if device is not None else _default_device(model, noise)
    y = _labels_tensor(labels, int(model.num_classes), device)
    n = y.shape[0]
    shape = (n, int(model.in_channels), int(model.input_size), int(model.input_size))
    if noise is not None and tuple(noise.shape) != shape:
        raise GraphcacheError(f"noise has shape {tuple(noise.shape)}; expected {shape}")

    diffusion = Diffusion(num_steps)
    use_cfg = cfg_scale is not None and cfg_scale > 1.0
    step = diffusion.ddim_step if sampler == "ddim" else diffusion.ddpm_step

    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        if noise is None:
            noise = torch.randn(*shape, device=device)
        x = noise.to(device)
        dtype = _model_dtype(model)
        net = model if dtype is None else _InDtype(model, dtype)
        if use_cfg:
            x = torch.cat([x, x], dim=0)
            y = torch.cat([y, torch.full_like(y, int(model.num_classes))], dim=0)
            net = guided(net, cfg_scale, guidance)

        steps = [torch.full((x.shape[0],), i, dtype=torch.long, device=device)
                 for i in range(diffusion.num_steps - 1, -1, -1)]
        timesteps = [diffusion.original_timesteps(t, x) for t in steps]
        start = getattr(model, "start_sampling", None)
        if callable(start):
            start(num_steps)
        announce = getattr(model, "announce_inputs", None)
        if callable(announce):  # the very tensors passed below: a cached model may precompute from them
            announce([(t, y) for t in timesteps])

        loop = zip(steps, timesteps)
        if progress:
            from tqdm.auto import tqdm

            loop = tqdm(loop, desc=f"{sampler} {num_steps}", total=diffusion.num_steps)
        for t, model_t in loop:
            out = net(x, model_t, y)
            x = step(out, x, t)

    return x.chunk(2, dim=0)[0] if use_cfg else x
