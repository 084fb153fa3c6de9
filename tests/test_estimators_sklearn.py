"""scikit-learn's estimator checks for every torchnmf estimator.

Checks that compare ``fit_transform`` with ``fit(...).transform`` need a converged fit, so
they run with more iterations; all other checks use a short fit to keep the suite fast.
There are no expected failures (see docs/estimators.rst).
"""
import warnings

from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from torchnmf.estimators import PNMF, BetaNMF, GammaPoissonFactorization

CONVERGED = {
    "BetaNMF": dict(max_iter=200, tol=1e-6),
    "GammaPoissonFactorization": dict(max_iter=50, tol=1e-8, transform_max_iter=50),
    "PNMF": dict(max_iter=150),
}
NEEDS_CONVERGENCE = ("check_transformer_general", "check_transformer_data_not_an_array")

ESTIMATORS = [
    BetaNMF(n_components=2, max_iter=10, random_state=0, device="cpu"),
    # check_estimator feeds uniform floats, so the count model accepts them here
    GammaPoissonFactorization(n_components=2, max_iter=3, transform_max_iter=3, allow_noninteger=True,
                              random_state=0, device="cpu"),
    PNMF(n_components=2, max_iter=10, random_state=0, device="cpu", allow_noninteger=True),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible(estimator, check):
    name = getattr(check, "func", check).__name__
    if name in NEEDS_CONVERGENCE:
        # a clone: the instance is shared by all checks of this estimator
        estimator = clone(estimator).set_params(**CONVERGED[type(estimator).__name__])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


# -- every estimator pickles and clones, fitted or not ----------------------------------------
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from torchnmf.estimators import SpatialPNMF  # noqa: E402

_RNG = np.random.default_rng(0)
_X = _RNG.poisson(2.0, size=(24, 6)).astype(np.float64)
_XY = _RNG.uniform(size=(24, 2))
_GROUPS = np.arange(24) % 2
PICKLED = {
    "BetaNMF": (lambda: BetaNMF(n_components=2, max_iter=5, random_state=0), {}),
    "GammaPoissonFactorization": (lambda: GammaPoissonFactorization(n_components=2, max_iter=3, transform_max_iter=3,
                                                                    random_state=0), {}),
    "PNMF-default": (lambda: PNMF(n_components=2, max_iter=5, random_state=0), {}),
    "PNMF-softplus": (lambda: PNMF(n_components=2, max_iter=5, loadings_mode="softplus", training_mode="standard",
                                   random_state=0), {}),
    "PNMF-exp": (lambda: PNMF(n_components=2, max_iter=5, loadings_mode="exp", random_state=0), {}),
    "PNMF-projected": (lambda: PNMF(n_components=2, max_iter=5, loadings_mode="projected", random_state=0), {}),
    "SpatialPNMF-SVGP": (lambda: SpatialPNMF(n_components=2, num_inducing=6, max_iter=5, transform_max_iter=3,
                                             random_state=0), {"coordinates": _XY}),
    "SpatialPNMF-SVGP-multigroup-softplus": (
        lambda: SpatialPNMF(n_components=2, num_inducing=6, max_iter=5, transform_max_iter=3, multigroup=True,
                            cholesky_mode="softplus", random_state=0), {"coordinates": _XY, "groups": _GROUPS}),
    "SpatialPNMF-LCGP": (lambda: SpatialPNMF(n_components=2, local=True, K=3, max_iter=5, transform_max_iter=3,
                                             random_state=0), {"coordinates": _XY}),
}


def _transform(est, covariates):
    kw = {k: v[:5] for k, v in covariates.items()}
    return np.asarray(est.transform(_X[:5], **kw))


def _modules(est):
    return {k: v for k, v in vars(est).items() if isinstance(v, torch.nn.Module)}


@pytest.mark.parametrize("fitted", [False, True], ids=["unfitted", "fitted"])
@pytest.mark.parametrize("name", sorted(PICKLED))
def test_every_estimator_pickles_and_clones(name, fitted):
    make, covariates = PICKLED[name]
    est = make()
    if fitted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(_X, **covariates)
        before = _transform(est, covariates)
        types_before = {k: type(v) for k, v in _modules(est).items()}
    again = pickle.loads(pickle.dumps(est))
    cloned = clone(est)
    assert cloned.get_params() == est.get_params() and not hasattr(cloned, "n_components_")
    assert type(again) is type(est) and again.get_params() == est.get_params()
    if not fitted:
        return
    # pickling leaves the original intact (its modules keep their parametrizations) ...
    assert {k: type(v) for k, v in _modules(est).items()} == types_before
    np.testing.assert_array_equal(_transform(est, covariates), before)
    # ... and the copy is the same model: same parameters, same parametrizations, same output
    for key, module in _modules(est).items():
        copy_ = getattr(again, key)
        for (n1, t1), (n2, t2) in zip(sorted(module.state_dict().items()), sorted(copy_.state_dict().items())):
            assert n1 == n2 and torch.equal(t1, t2), n1
        for (p1, m1), (p2, m2) in zip(module.named_modules(), copy_.named_modules()):
            assert p1 == p2 and parametrize.is_parametrized(m1) == parametrize.is_parametrized(m2), p1
            if parametrize.is_parametrized(m1):
                for tname in m1.parametrizations:
                    o1, o2 = getattr(m1.parametrizations, tname).original, getattr(m2.parametrizations, tname).original
                    assert type(o1) is type(o2) and getattr(o1, "mode", None) == getattr(o2, "mode", None)
                    assert torch.equal(getattr(m1, tname), getattr(m2, tname))
    np.testing.assert_array_equal(_transform(again, covariates), before)
    # and pickles again
    np.testing.assert_array_equal(_transform(pickle.loads(pickle.dumps(again)), covariates), before)
