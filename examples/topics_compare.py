"""Topic quality: Gamma-Poisson factorization against scikit-learn's LDA on the same corpus.

Both models get the Reuters corpus shipped with the ``lda`` package (395 stories, 4258
words) at the same rank, and the same stop-word rule: words in more than ``--max-df`` of
the stories are dropped before fitting (``--max-df 1`` keeps all). Each topic's ``--top``
words are scored over the corpus itself:

* UMass coherence (Mimno et al. 2011): mean over word pairs ``(w_i, w_j)``, ``w_j`` ranked
  above ``w_i``, of ``log((D(w_i, w_j) + 1) / D(w_j))`` with ``D`` document frequencies;
  higher (closer to 0) is better.
* NPMI (Bouma 2009; Lau et al. 2014) over document co-occurrence: mean over pairs of
  ``log(p(w_i, w_j) / (p(w_i) p(w_j))) / -log p(w_i, w_j)`` (``-1`` for pairs never seen
  together); in ``[-1, 1]``, higher is better.
* The fraction of distinct words among all topics' top words (1: no word shared).

Run::

    python examples/topics_compare.py            # 10 topics, as in benchmarks/README.md
    python examples/topics_compare.py --quick    # 6 topics, 1500 words, short fits (CI)
    python examples/topics_compare.py --out out/examples   # also writes topics_compare.json
"""
import argparse
import json
import os
import time

import numpy as np
import scipy.sparse as sp


def cooccurrence(X):
    """Document frequencies ``df`` (n_words,) and co-document counts ``co`` (n_words, n_words)."""
    B = sp.csr_matrix((np.asarray(X) > 0).astype(np.float64)) if not sp.issparse(X) else (X > 0).astype(np.float64)
    df = np.asarray(B.sum(0)).ravel()
    co = (B.T @ B).toarray()
    return df, co


def umass(top, df, co):
    """Mean UMass coherence of the topics' top-word index lists (ranked, best first)."""
    scores = []
    for t in top:
        pairs = [np.log((co[t[i], t[j]] + 1.0) / df[t[j]]) for i in range(1, len(t)) for j in range(i)]
        scores.append(np.mean(pairs))
    return float(np.mean(scores))


def npmi(top, df, co, n_docs):
    """Mean normalised pointwise mutual information of the topics' top-word pairs."""
    scores = []
    for t in top:
        pairs = []
        for i in range(len(t)):
            for j in range(i + 1, len(t)):
                pij = co[t[i], t[j]] / n_docs
                if pij == 0:
                    pairs.append(-1.0)
                elif pij == 1:
                    pairs.append(1.0)
                else:
                    pairs.append(np.log(pij / (df[t[i]] / n_docs * df[t[j]] / n_docs)) / -np.log(pij))
        scores.append(np.mean(pairs))
    return float(np.mean(scores))


def distinct(top):
    """Fraction of distinct words among all top words."""
    words = np.concatenate([np.asarray(t) for t in top])
    return len(set(words.tolist())) / len(words)


def top_words(components, n):
    """Indices of each topic's ``n`` largest weights, largest first; ``components`` (K, n_words)."""
    return [np.argsort(-c, kind="stable")[:n] for c in np.asarray(components)]


def load(max_df, quick):
    try:
        import lda.datasets
    except ImportError:
        raise SystemExit("this example reads the Reuters corpus shipped with lda: pip install lda") from None
    X = np.asarray(lda.datasets.load_reuters())
    vocab = np.array(lda.datasets.load_reuters_vocab())
    keep = (X > 0).mean(0) <= max_df
    if quick:  # the most frequent remaining words only
        freq = np.where(keep, X.sum(0), -1)
        keep = np.zeros_like(keep)
        keep[np.argsort(-freq)[:1500]] = True
    return X[:, keep], vocab[keep]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--top", type=int, default=10, help="top words scored per topic (default 10)")
    p.add_argument("--max-df", type=float, default=0.2,
                   help="drop words in more than this fraction of stories (default 0.2; 1 keeps all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--init", default="nmf", choices=("nmf", "nndsvda", "random"),
                   help="start of the Gamma-Poisson fit (default 'nmf', the estimator's default)")
    p.add_argument("--seed", type=int, default=0, help="random_state of both models (default 0)")
    p.add_argument("--out", default=None, help="folder for topics_compare.json (the scores and top words)")
    args = p.parse_args(argv)
    from sklearn.decomposition import LatentDirichletAllocation

    from torchnmf.estimators import GammaPoissonFactorization

    K = args.topics or (6 if args.quick else 10)
    sweeps = 15 if args.quick else 150
    X, vocab = load(args.max_df, args.quick)
    df, co = cooccurrence(X)
    n_docs = X.shape[0]
    print(f"Reuters: {X.shape[0]} stories x {X.shape[1]} words (max_df {args.max_df}), {K} topics, "
          f"top {args.top} words, Gamma-Poisson init {args.init!r}, seed {args.seed}")
    rows = []
    t0 = time.perf_counter()
    lda = LatentDirichletAllocation(K, learning_method="batch", max_iter=sweeps,
                                    random_state=args.seed).fit(X)
    rows.append(("sklearn LatentDirichletAllocation", lda.components_, time.perf_counter() - t0))
    t0 = time.perf_counter()
    gp = GammaPoissonFactorization(K, init=args.init, max_iter=sweeps, tol=1e-5, random_state=args.seed,
                                   device=args.device, dtype="float64").fit(sp.csr_matrix(X))
    rows.append(("torchnmf GammaPoissonFactorization", gp.components_, time.perf_counter() - t0))
    print(f"| model | UMass | NPMI | distinct top words | seconds |")
    print(f"|---|---|---|---|---|")
    scores = []
    for name, comps, seconds in rows:
        top = top_words(comps, args.top)
        scores.append({"model": name, "umass": float(umass(top, df, co)), "npmi": float(npmi(top, df, co, n_docs)),
                       "distinct": float(distinct(top)), "seconds": round(seconds, 2),
                       "top_words": [vocab[t].tolist() for t in top_words(comps, 8)]})
        print(f"| {name} | {scores[-1]['umass']:.3f} | {scores[-1]['npmi']:.3f} | "
              f"{scores[-1]['distinct']:.2f} | {seconds:.1f} |")
    for name, comps, _ in rows:
        print(f"\n{name}:")
        for k, t in enumerate(top_words(comps, 8)):
            print(f"  topic {k:2d}: {' '.join(vocab[t])}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "topics_compare.json")
        with open(path, "w") as fh:
            json.dump({"shape": list(X.shape), "topics": K, "top": args.top, "scores": scores}, fh, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
