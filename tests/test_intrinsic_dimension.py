"""The intrinsic-dimension estimators against known answers and against dadapy's own numbers.

dadapy (the library the token-geometry paper uses) pins numpy<2 and jax, so it is not a dependency.
Its numbers below were produced in a separate environment with the script next to this file:

    python3 -m venv /tmp/dadapy-env && /tmp/dadapy-env/bin/pip install dadapy==0.3.4   # numpy 1.26.4
    /tmp/dadapy-env/bin/python tests/reference/dadapy_gride.py

which prints ``Data(X).return_id_scaling_gride(range_max=256)`` (ids, errors, scales) for a 6-D Gaussian
linearly embedded in 30 dimensions (1000 points) and a noisy flat 2-torus in R^4 (800 points).
dadapy's TwoNN maximum-likelihood estimate on the same points (equal to GRIDE's first scale):

    /tmp/dadapy-env/bin/python -c "exec(open('tests/reference/dadapy_gride.py').read().split('np.set_printoptions')[0])
    for make in (gaussian, torus): print(repr(Data(make()).compute_id_2NN(algorithm='ml', mu_fraction=1)[0]))"

(dadapy's default ``compute_id_2NN()`` is a different estimator: a linear fit to the lowest 90% of the
ratios, 5.9335 and 2.1705 here.) dadapy bisects to 1e-7, so ids and errors agree to ~3e-8 relative.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from workbench.analyses import intrinsic_dimension as idm

DADAPY = {  # dadapy 0.3.4: ids, errors, rs at n2 = 2, 4, ..., 256
    "gaussian": (
        [5.9817622893, 5.9894514554, 5.7065434142, 5.5943341737, 5.4629041426, 5.0984759463, 4.7370519608, 4.1198514290],
        [0.1891599326, 0.1365488358, 0.0921813631, 0.0638825478, 0.0440917428, 0.0290889792, 0.0191077312, 0.0117499260],
        [5.1463297573, 5.9324834451, 6.7611929602, 7.6848023644, 8.7285620237, 9.9583276618, 11.4631938345, 13.4125838734],
    ),
    "torus": (
        [2.2383717547, 1.9740680857, 1.9706992625, 2.0420464748, 2.0286838718, 2.1161384666, 2.2219266518, 2.4826009022],
        [0.0791383923, 0.0502960099, 0.0355932021, 0.0260671959, 0.0183082381, 0.0134970468, 0.0100194152, 0.0079154526],
        [0.1380584033, 0.2025321110, 0.2948685224, 0.4215556872, 0.5962529889, 0.8343201363, 1.1487387143, 1.5409536813],
    ),
}
DADAPY_TWONN_ML = {"gaussian": 5.981762290279851, "torus": 2.2383717702359007}


def _reference_points():
    spec = importlib.util.spec_from_file_location("ref", Path(__file__).parent / "reference" / "dadapy_gride.py")
    source = spec.loader.get_source("ref").split("np.set_printoptions")[0].replace("from dadapy import Data\n", "")
    namespace: dict = {}
    exec(compile(source, "dadapy_gride.py", "exec"), namespace)  # the same point generators, without dadapy
    return {"gaussian": namespace["gaussian"](), "torus": namespace["torus"]()}


@pytest.mark.parametrize("name", ["gaussian", "torus"])
def test_gride_equals_dadapy(name):
    got = idm.gride_scales(_reference_points()[name], max_rank=256)
    ids, errors, scales = (np.asarray(v) for v in DADAPY[name])
    assert list(got["n2"]) == [2, 4, 8, 16, 32, 64, 128, 256]
    np.testing.assert_allclose(got["id"], ids, rtol=1e-6)  # dadapy bisects to 1e-7
    np.testing.assert_allclose(got["id_error"], errors, rtol=1e-6)
    np.testing.assert_allclose(got["scale"], scales, rtol=1e-9)


@pytest.mark.parametrize("name", ["gaussian", "torus"])
def test_twonn_equals_dadapy(name):
    distances, _ = idm.neighbour_distances(_reference_points()[name], 2)
    assert idm.gride(distances, 1)[0] == pytest.approx(DADAPY_TWONN_ML[name], rel=1e-12)


def test_twonn_closed_form():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(300, 4))
    dist, _ = idm.neighbour_distances(points, 2)
    log_mu = np.log(dist[:, 1] / dist[:, 0])
    q95, q50 = np.percentile(np.exp(log_mu), [95, 50])
    kept = log_mu[np.exp(log_mu) < q50 + 20 * (q95 - q50)]
    d, err = idm.gride(dist, 1)
    assert d == pytest.approx((len(kept) - 1) / kept.sum())
    assert err == pytest.approx(d / np.sqrt(len(kept)))  # Fisher information N / d^2


@pytest.mark.parametrize("d", [2, 5, 10])
def test_gaussians_of_known_dimension(d):
    """A d-dimensional standard Gaussian linearly embedded in 50 dims (n = 2000, noise 1e-6).

    Up to n2 = 8 every estimate is within 10% of d (TwoNN's standard error is ~2% of d; the rest is
    the bias below, 8.5% at d = 10, n2 = 8). At larger scales GRIDE underestimates a Gaussian's ID:
    it assumes a constant density out to the n2-th neighbour, and a density falling off across the
    neighbourhood reads as fewer dimensions, the more so the higher d and the larger n2 (seen here:
    2-D stays within 5% up to n2 = 256; 5-D ends at 4.3; 10-D falls steadily from 9.6 to 6.7).
    """
    rng = np.random.default_rng(d)
    points = rng.normal(size=(2000, d)) @ rng.normal(size=(d, 50)) + rng.normal(scale=1e-6, size=(2000, 50))
    got = idm.gride_scales(points, max_rank=256)
    ids = got["id"]
    np.testing.assert_allclose(ids[got["n2"] <= 8], d, rtol=0.1)
    if d == 2:
        np.testing.assert_allclose(ids, 2, rtol=0.05)
    if d == 10:
        assert (np.diff(ids) < 0).all() and ids[-1] < 0.75 * d


def test_torus_is_two_dimensional_across_scales():
    """A flat 2-torus (exactly 2-D, uniform density) linearly mapped into R^20 with noise 1e-4: every scale up
    to n2 = 64 is within 0.1 of 2 (TwoNN's standard error is 0.05). At n2 = 256 of 1500 points neighbourhoods
    span a good part of each circle, chords fall short of arcs and the estimate climbs to 2.3."""
    rng = np.random.default_rng(5)
    u, v = rng.uniform(0, 2 * np.pi, (2, 1500))
    torus = np.stack([np.cos(u), np.sin(u), np.cos(v), np.sin(v)], 1) @ rng.normal(size=(4, 20))
    got = idm.gride_scales(torus + rng.normal(scale=1e-4, size=torus.shape), max_rank=256)
    np.testing.assert_allclose(got["id"][got["n2"] <= 64], 2, atol=0.1)
    assert got["id"][-1] > 2.2


def test_neighbour_distances_match_brute_force():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 7)) * 100 + 1e4  # far from the origin: the centring matters
    brute = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(brute, np.inf)
    for k in (5, 30, 48, 49):  # partial sorts, and every other point
        dist, idx = idm.neighbour_distances(points, k)
        np.testing.assert_allclose(dist, np.sort(brute, 1)[:, :k], rtol=1e-9)
        np.testing.assert_array_equal(idx, np.argsort(brute, 1)[:, :k])
        for n_indices in (1, 3, k):  # fewer indices than distances, ranked the same way
            _, some = idm.neighbour_distances(points, k, n_indices=n_indices, gram=idm.centred_gram(points))
            np.testing.assert_array_equal(some, np.argsort(brute, 1)[:, :n_indices])


def test_cosine_statistics_match_pairwise_brute_force():
    """Cosines from the centred Gram matrix (with its mean put back), against every pair computed directly."""
    rng = np.random.default_rng(1)
    for offset in (0.0, 50.0):  # a cloud about the origin, and one far from it (cosines near 1)
        points = rng.normal(size=(40, 6)) + offset
        unit = points / np.linalg.norm(points, axis=1, keepdims=True)
        pairs = np.array([unit[i] @ unit[j] for i in range(40) for j in range(i + 1, 40)])
        mean, std = idm.cosine_similarity_stats(points)
        assert mean == pytest.approx(pairs.mean(), rel=1e-12)
        assert std == pytest.approx(pairs.std(), rel=1e-6)


def test_overlap_hand_built():
    a = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])[:, None]  # gaps 1, 2, 3, 4, 5: no ties
    assert idm.neighbour_overlap(a, 3 * a + 7, k=2) == 1.0  # same neighbours after an affine map
    # the last point moves to 2.4: nearest neighbours 0->1, 1->0, 3->1 becomes 3->2.4, 6->3, 10->6, 15->10 becomes 2.4->3
    b = np.array([0.0, 1.0, 3.0, 6.0, 10.0, 2.4])[:, None]
    assert idm.neighbour_overlap(a, b, k=1) == pytest.approx(4 / 6)


def test_cosine_hand_built():
    assert idm.cosine_similarity_stats(np.eye(4)) == (0.0, 0.0)
    mean, std = idm.cosine_similarity_stats(np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
    sims = np.array([1 / np.sqrt(2), -1.0, -1 / np.sqrt(2)])
    assert (mean, std) == (pytest.approx(sims.mean()), pytest.approx(sims.std()))


def test_unique_points():
    points = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    unique, removed = idm.unique_points(points)
    np.testing.assert_array_equal(unique, [[1, 2], [0, 0], [3, 3]])
    assert removed == 2
    assert idm.unique_points(np.array([[0.0, 1.0], [-0.0, 1.0]]))[1] == 1  # the same point
    assert idm.unique_points(np.zeros((0, 3)))[0].shape == (0, 3)


def test_bad_input():
    with pytest.raises(ValueError, match="duplicates"):
        idm.gride_scales(np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 3"):
        idm.gride_scales(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        idm.neighbour_distances(np.array([[0.0], [np.nan], [1.0]]), 1)
    with pytest.raises(ValueError, match="lower max_rank"):
        idm.neighbour_distances(np.random.default_rng(0).normal(size=(5, 2)), 5)
    with pytest.raises(ValueError, match="lower k"):
        idm.neighbour_overlap(np.eye(3), np.eye(3), k=3)
    with pytest.raises(ValueError, match="same points"):
        idm.overlap_curve(np.eye(3), np.eye(4)[:, :3], [1])
    with pytest.raises(ValueError, match="zero vector"):
        idm.cosine_similarity_stats(np.zeros((3, 2)))
