"""Recovery of simulated factors by PNMF's training options (correlation after matching).

Counts ``X ~ Poisson(exp(F) W^T)`` with ``F ~ N(0, 1)`` (N x K) and Gamma(0.6, 1/0.4) loadings
``W`` (D x K), as in tests/test_estimator_pnmf.py. Each option is fitted from several seeds;
the table gives the mean (and min) over seeds of the mean correlation between true and fitted
log-factors ``F`` and loadings ``W``, columns matched by the best permutation
(:func:`scipy.optimize.linear_sum_assignment`), the final ELBO per entry, and the wall time.

Rows: torchnmf's own :class:`torchnmf.estimators.PNMF` (its defaults, natural steps for
``q(F)`` with multiplicative loadings, beside Adam and other mixes) and the seed-compatible
:class:`torchnmf.compat.pnmf.PNMF` (the PNMF document's defaults: Adam, ``'expanded'``,
one-cycle schedule, lr 0.01, 200 epochs, tol 1e-4; and natural + multiplicative with them or
with ``'lower-bound'``, lr 0.5 and no schedule).

Usage::

    python benchmarks/pnmf_recovery.py            # N=300, D=60, K=5, 4 seeds
    python benchmarks/pnmf_recovery.py --quick    # N=100, D=30, K=3, 2 seeds
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from torchnmf.compat.pnmf import PNMF as CompatPNMF
from torchnmf.estimators import PNMF


def simulate(N, D, K, seed):
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((N, K))
    W = rng.gamma(0.6, 1 / 0.4, size=(D, K))
    return rng.poisson(np.exp(F) @ W.T).astype(np.float64), W, F


def matched_corr(A, B):
    """Correlations of the columns of ``A`` and ``B`` paired by the best permutation, shape (K,)."""
    A = (A - A.mean(0)) / A.std(0).clip(1e-12)
    B = (B - B.mean(0)) / B.std(0).clip(1e-12)
    C = A.T @ B / A.shape[0]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


STD = dict(training_mode="standard", loadings_mode="softplus")
NAT = dict(training_mode="natural", loadings_mode="multiplicative")
OPTIONS = {
    "PNMF() default: natural, multiplicative, lower-bound": lambda K, s: PNMF(K, random_state=s),
    "PNMF(standard, softplus): Adam, the default before": lambda K, s: PNMF(K, random_state=s, **STD),
    "PNMF(standard, softplus, learning_rate=0.2)": lambda K, s: PNMF(K, learning_rate=0.2, random_state=s, **STD),
    "PNMF(natural, softplus): Adam for W": lambda K, s: PNMF(K, training_mode="natural", loadings_mode="softplus",
                                                            random_state=s),
    "PNMF(natural, multiplicative, expanded)": lambda K, s: PNMF(K, mode="expanded", random_state=s, **NAT),
    "compat PNMF() document defaults": lambda K, s: CompatPNMF(K, random_state=s, device="cpu"),
    "compat PNMF(natural, multiplicative)": lambda K, s: CompatPNMF(K, random_state=s, device="cpu", **NAT),
    "compat PNMF(natural, multiplicative, lower-bound, lr 0.5, no scheduler)": lambda K, s: CompatPNMF(
        K, mode="lower-bound", learning_rate=0.5, scheduler=None, random_state=s, device="cpu", **NAT),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--only", default=None, help="run the options whose name contains this text")
    args = ap.parse_args()
    N, D, K = (100, 30, 3) if args.quick else (300, 60, 5)
    seeds = args.seeds or (2 if args.quick else 4)
    warnings.simplefilter("ignore")
    print(f"N={N} D={D} K={K}, {seeds} seeds (mean [min] over seeds of the mean matched correlation)")
    print(f"{'option':72s} {'corr F':>15s} {'corr W':>15s} {'ELBO/entry':>11s} {'epochs':>7s} {'s/fit':>6s}")
    for name, make in OPTIONS.items():
        if args.only and args.only not in name:
            continue
        cf, cw, el, its, ts = [], [], [], [], []
        for s in range(seeds):
            X, W, F = simulate(N, D, K, s)
            est = make(K, s)
            t = time.perf_counter()
            est.fit(X)
            ts.append(time.perf_counter() - t)
            core = getattr(est, "estimator_", est)
            cf.append(matched_corr(core.log_factors(), F).mean())
            cw.append(matched_corr(core.components_.T, W).mean())
            el.append(est.elbo_ / X.size)
            its.append(est.n_iter_)
        print(f"{name:72s} {np.mean(cf):8.3f} [{min(cf):.3f}] {np.mean(cw):8.3f} [{min(cw):.3f}] "
              f"{np.mean(el):11.4f} {np.mean(its):7.0f} {np.mean(ts):6.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
