"""Shared fixtures: the posenc module from the build tree (PYTHONPATH), seeded random arrays, and the
tolerance rule every comparison uses."""

import numpy as np
import pytest

import posenc  # noqa: F401  (fails the whole run early, with the import error, when the build is missing)

# Tolerance of a comparison against a float64 reference: C * eps(dtype) * max(|ref|, 1), with C
# covering a few roundings per term of a sum of length up to a few hundred.
# float16 storage is computed in float32 and rounded once: a few of its ulps.
TOLERANCE_ULPS = {np.float16: 4, np.float32: 64, np.float64: 4096}


def tolerance(dtype):
    return TOLERANCE_ULPS[dtype] * np.finfo(dtype).eps


def angle_error(positions, inv_freq, values):
    """Absolute error a float64 reference inherits from rounding its angles p * inv_freq (about
    eps * p * inv_freq radians; posenc's angles are exact to long double), times the largest value it
    multiplies: the extra tolerance of comparisons of rotations at large positions."""
    return 4 * np.finfo(np.float64).eps * float(np.max(np.abs(positions))) * float(np.max(inv_freq)) * \
        float(np.max(np.abs(values)))


def assert_close(got, ref, dtype, what, atol=0.0):
    """Fails with the worst element, its index and the bound, as the C++ tests do. The bound is
    tolerance(dtype) * max(|ref|, 1) + atol."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    bound = tolerance(dtype) * np.maximum(np.abs(ref), 1.0) + atol
    both_inf = np.isinf(ref) & (got == ref)
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf (fully masked rows)
        err = np.where(both_inf, 0.0, np.abs(got - ref))
    excess = np.nan_to_num(err / bound, nan=np.inf)
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[worst] <= 1.0, (
        f"{what}: worst element at {tuple(int(i) for i in worst)}: got {got[worst]!r}, reference {ref[worst]!r}, "
        f"|diff| {err[worst]:.3g} > bound {bound[worst]:.3g}")


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param
