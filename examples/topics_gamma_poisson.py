"""Topic model of Reuters news with Gamma-Poisson factorization.

The ``lda`` package (PyPI, MPL-2.0) ships a bag-of-words corpus: 395 Reuters news stories
over a 4258-word vocabulary (``lda.datasets.load_reuters``), no download needed. Poisson
factorization with Gamma priors writes the word counts as
``X[d, w] ~ Poisson(sum_k U[d, k] alpha[w, k])``: ``alpha[:, k]`` is topic ``k``'s word
profile and ``U[d, :]`` the topic intensities of story ``d``. The fit uses
:class:`torchnmf.estimators.GammaPoissonFactorization` (coordinate ascent on the nonzeros
only) and prints the top words of each topic and the main topic of a few stories.

Words in more than ``--max-df`` (default 20%) of the stories are dropped first, as stop words
of this corpus: "church" is in 80% of them, "years", "last", "told" and "people" in about
half. Kept, they lead the top words of most topics (for LDA too), because a Poisson model
explains a word that is everywhere with every topic. ``examples/topics_compare.py`` scores
the topics against scikit-learn's LDA (see benchmarks/README.md).

The fit starts from a KL-NMF solution (``init='nmf'``, the estimator's default): random
starts of the coordinate ascent end in topics of very different quality from one seed to the
next, while this deterministic start gives topics at least as coherent as LDA's.

Run::

    python examples/topics_gamma_poisson.py            # 10 topics, 150 sweeps
    python examples/topics_gamma_poisson.py --quick    # 6 topics, 15 sweeps, 1500 words (CI)
    python examples/topics_gamma_poisson.py --out out/examples   # also writes topics_gamma_poisson.json
"""
import argparse
import json
import os

import numpy as np
import scipy.sparse as sp

from torchnmf.estimators import GammaPoissonFactorization


def load_corpus():
    try:
        import lda.datasets
    except ImportError:
        raise SystemExit("this example reads the Reuters corpus shipped with lda: pip install lda") from None
    X = lda.datasets.load_reuters()  # (395, 4258) int counts
    vocab = np.array(lda.datasets.load_reuters_vocab())
    titles = list(lda.datasets.load_reuters_titles())
    return X, vocab, titles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-df", type=float, default=0.2,
                   help="drop words in more than this fraction of the stories (default 0.2; 1 keeps all)")
    p.add_argument("--out", default=None, help="folder for topics_gamma_poisson.json (the topics' top words)")
    args = p.parse_args(argv)
    n_topics = args.topics or (6 if args.quick else 10)
    X, vocab, titles = load_corpus()
    common = (X > 0).mean(0) > args.max_df
    X, vocab = X[:, ~common], vocab[~common]
    if args.quick:  # the most frequent words only
        keep = np.sort(np.argsort(-X.sum(0))[:1500])
        X, vocab = X[:, keep], vocab[keep]
    X = sp.csr_matrix(X)
    print(f"Reuters corpus: {X.shape[0]} stories x {X.shape[1]} words, {X.nnz} nonzero counts "
          f"({int(common.sum())} words in more than {args.max_df:.0%} of the stories dropped)")

    est = GammaPoissonFactorization(n_topics, init="nmf", max_iter=15 if args.quick else 150, tol=1e-5,
                                    random_state=0, device=args.device, dtype="float64")
    U = est.fit_transform(X)  # (stories, topics) posterior means
    print(f"{est.n_iter_} CAVI sweeps, ELBO {est.elbo_:.1f}")
    order = np.argsort(-U.sum(0))
    topics = []
    for k in order:
        top = vocab[np.argsort(-est.components_[k])[:8]]
        print(f"topic {k:2d} ({U[:, k].sum() / U.sum():5.1%}): {' '.join(top)}")
        topics.append({"topic": int(k), "share": float(U[:, k].sum() / U.sum()), "top_words": top.tolist()})
    print()
    for d in range(0, X.shape[0], X.shape[0] // 5)[:5]:
        k = int(np.argmax(U[d]))
        title = titles[d].split(" ", 1)[-1][:60]
        print(f"story {d:3d} -> topic {k:2d}: {title}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "topics_gamma_poisson.json")
        with open(path, "w") as fh:
            json.dump({"shape": list(X.shape), "n_iter": int(est.n_iter_), "elbo": float(est.elbo_),
                       "topics": topics}, fh, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
