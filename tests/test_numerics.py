"""Shared numerics: hand-built answers and scipy as the independent computation."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from workbench.numerics import (
    entropy_from_logprobs,
    entropy_from_probs,
    kl_divergence_arrays,
    kl_from_logprobs,
    logsumexp,
    wilson_interval,
)


def test_hand_built_values():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert float(entropy_from_probs(p)) == pytest.approx(math.log(2))  # 0 log 0 = 0
    assert float(entropy_from_logprobs(p.log())) == pytest.approx(math.log(2))
    assert float(kl_from_logprobs(p.log(), q.log())) == pytest.approx(math.log(2))  # sum 0.5 log(0.5/0.25)
    assert kl_divergence_arrays(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == math.inf
    assert logsumexp([math.log(1), math.log(3)]) == pytest.approx(math.log(4))
    assert logsumexp([]) == -math.inf and logsumexp([-math.inf, -math.inf]) == -math.inf
    low, high = wilson_interval([0], [3])
    z = stats.norm.ppf(0.975)
    assert low[0] == pytest.approx(0, abs=1e-12) and high[0] == pytest.approx(z**2 / (3 + z**2))
    assert np.isnan(wilson_interval([0], [0])[0]).all()


def test_against_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(50), size=4), rng.dirichlet(np.ones(50), size=4)
    logp, logq = torch.from_numpy(np.log(p)), torch.from_numpy(np.log(q))
    np.testing.assert_allclose(kl_from_logprobs(logp, logq).numpy(), stats.entropy(p, q, axis=-1), rtol=1e-10)
    np.testing.assert_allclose(kl_divergence_arrays(p, q), stats.entropy(p, q, axis=-1), rtol=1e-10)
    np.testing.assert_allclose(entropy_from_logprobs(logp).numpy(), stats.entropy(p, axis=-1), rtol=1e-10)
    np.testing.assert_allclose(entropy_from_probs(torch.from_numpy(p)).numpy(), stats.entropy(p, axis=-1), rtol=1e-10)
    values = rng.normal(size=20) * 50
    assert logsumexp(values) == pytest.approx(float(special.logsumexp(values)), rel=1e-12)
    successes, n = np.array([3, 17, 40]), np.array([10, 20, 40])
    low, high = wilson_interval(successes, n)
    for s, m, lo, hi in zip(successes, n, low, high):  # the closed form, z = 97.5% normal quantile
        z, phat = stats.norm.ppf(0.975), s / m
        centre = (phat + z**2 / (2 * m)) / (1 + z**2 / m)
        half = z * math.sqrt(phat * (1 - phat) / m + z**2 / (4 * m**2)) / (1 + z**2 / m)
        assert (lo, hi) == pytest.approx((centre - half, centre + half))
