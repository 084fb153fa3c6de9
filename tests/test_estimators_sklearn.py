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
    PNMF(n_components=2, max_iter=10, random_state=0, device="cpu"),
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
