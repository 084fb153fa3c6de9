"""Where default fits stop: iterations, final objective, and the objective of the same fit with tol=0.

For each estimator on scikit-learn's digits (1797 x 64) and on an image matrix (16x16 patches
of scikit-learn's bundled ``china.jpg``, 1500 images x 256 pixels): the default fit
(default ``tol`` and ``max_iter``), the same fit with ``tol=0`` (all ``max_iter`` steps), the gap
between their final objectives, and whether the default fit warned. Runs on any torchnmf
checkout (``PYTHONPATH=/path/to/old/checkout python benchmarks/convergence.py`` gives the
"before" table).

    python benchmarks/convergence.py [--quick]
"""
import argparse
import time
import warnings

import numpy as np
import torch


def datasets(quick: bool):
    from sklearn.datasets import load_digits, load_sample_image
    from sklearn.feature_extraction.image import extract_patches_2d

    digits = load_digits().data.astype(np.float64)
    gray = load_sample_image("china.jpg").mean(axis=2)
    P = extract_patches_2d(gray, (16, 16), max_patches=300 if quick else 1500, random_state=0)
    image = P.reshape(len(P), -1).astype(np.float64)
    if quick:
        digits = digits[:300]
    return {"digits": digits, "china-patches": image}


def estimators(quick: bool):
    from torchnmf.estimators import PNMF, BetaNMF, GammaPoissonFactorization

    few = {"max_iter": 20} if quick else {}
    return {
        "BetaNMF KL": (lambda **kw: BetaNMF(n_components=16, random_state=0, device="cpu", **{**few, **kw}), False),
        "BetaNMF Frobenius": (lambda **kw: BetaNMF(n_components=16, beta_loss="frobenius", random_state=0,
                                                   device="cpu", **{**few, **kw}), False),
        "GammaPoisson": (lambda **kw: GammaPoissonFactorization(n_components=16, random_state=0, device="cpu",
                                                                **{**few, **kw}), True),
        "PNMF": (lambda **kw: PNMF(n_components=8, random_state=0, device="cpu", **{**few, **kw}), True),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and 20 iterations (a smoke run)")
    parser.add_argument("--only", nargs="*", help="estimator names to run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'data':14s} {'estimator':18s} {'n_iter':>6s} {'max_iter':>8s} {'objective':>14s} "
          f"{'tol=0 objective':>16s} {'gap':>8s} {'warned':>6s} {'seconds':>8s}")
    for dname, X in datasets(args.quick).items():
        for name, (make, counts) in estimators(args.quick).items():
            if args.only and name not in args.only:
                continue
            Xd = np.round(X / 8) if counts and dname == "china-patches" else np.round(X) if counts else X
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                est = make().fit(Xd)
                seconds = time.perf_counter() - t0
            warned = any("max_iter" in str(w.message) or "converg" in str(w.message).lower() for w in rec)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = make(tol=0.0).fit(Xd)
            f, f0 = est.history_.values[-1], full.history_.values[-1]
            gap = (f - f0) / abs(f0) * (-1 if est.history_.maximize else 1)
            print(f"{dname:14s} {name:18s} {est.n_iter_:6d} {full.n_iter_:8d} {f:14.6g} {f0:16.6g} "
                  f"{gap:8.2%} {str(warned):>6s} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
