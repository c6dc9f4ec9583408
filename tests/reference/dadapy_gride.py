"""Reference numbers from dadapy 0.3.4 (numpy 1.26) for tests/test_intrinsic_dimension.py."""
import numpy as np
from dadapy import Data


def gaussian():
    rng = np.random.default_rng(0)
    return rng.normal(size=(1000, 6)) @ rng.normal(size=(6, 30))


def torus():
    rng = np.random.default_rng(1)
    u, v = rng.uniform(0, 2 * np.pi, (2, 800))
    x = np.stack([np.cos(u), np.sin(u), np.cos(v), np.sin(v)], 1)
    return x + rng.normal(scale=0.01, size=x.shape)


np.set_printoptions(precision=10, floatmode="fixed", linewidth=200)
for name, make in (("gaussian", gaussian), ("torus", torus)):
    ids, errs, rs = Data(make()).return_id_scaling_gride(range_max=256)
    print(name, "ids", repr(ids), "errs", repr(errs), "rs", repr(rs), sep="\n")
