"""A topic hierarchy of Reuters news: words -> topics -> super-topics, by deep Poisson factorization.

The ``lda`` package ships a bag-of-words corpus (395 Reuters stories x 4258 words,
``lda.datasets.load_reuters``). A chain of two :class:`torchnmf.poisson.GammaNMF` layers writes
the counts as ``X ~ Poisson(H W1ᵀ W2ᵀ)``: ``W2`` (words x topics) holds the topics' word rates,
``W1`` (topics x super-topics) how each super-topic mixes topics, and ``H`` (stories x
super-topics) the stories' weights. :class:`torchnmf.trainer.CAVI` fits it through a closure,
touching the counts at their nonzeros only; the best ELBO of a few restarts is kept. The script
prints each super-topic's top words (columns of ``W2 W1``) and its main topics.

Run::

    python examples/deep_topics.py            # 16 topics, 4 super-topics, 300 sweeps, 3 restarts
    python examples/deep_topics.py --quick    # 8 topics, 3 super-topics, 40 sweeps, 1500 words (CI)
    python examples/deep_topics.py --out out/examples   # also writes deep_topics.json
"""
import argparse
import json
import os

import numpy as np
import scipy.sparse as sp
import torch

from torchnmf.poisson import CountMatrix, GammaChain, GammaNMF


def load_corpus():
    try:
        import lda.datasets
    except ImportError:
        raise SystemExit("this example reads the Reuters corpus shipped with lda: pip install lda") from None
    return lda.datasets.load_reuters(), np.array(lda.datasets.load_reuters_vocab())


def fit(data, topics, supers, sweeps, seed):
    g = torch.Generator().manual_seed(seed)
    model = GammaChain(GammaNMF((data.shape[0], topics), rank=supers, dtype=torch.float64, generator=g),
                       GammaNMF(W=(data.shape[1], topics), dtype=torch.float64, generator=g))
    elbos = model.fit(data, max_iter=sweeps, tol=0).values  # CAVI sweeps through the fit engine
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbos, elbos[1:])), "the ELBO decreased"
    return model, elbos[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--supers", type=int, default=None)
    p.add_argument("--sweeps", type=int, default=None)
    p.add_argument("--restarts", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for deep_topics.json (super-topics, their words and topics)")
    args = p.parse_args(argv)
    topics = args.topics or (8 if args.quick else 16)
    supers = args.supers or (3 if args.quick else 4)
    sweeps = args.sweeps or (40 if args.quick else 300)
    restarts = args.restarts or (1 if args.quick else 3)
    X, vocab = load_corpus()
    if args.quick:  # the most frequent words only
        keep = np.sort(np.argsort(-X.sum(0))[:1500])
        X, vocab = X[:, keep], vocab[keep]
    data = CountMatrix.from_input(sp.csr_matrix(X), "X", dtype=torch.float64)  # indexed once
    print(f"Reuters corpus: {X.shape[0]} stories x {X.shape[1]} words, {data.nnz} nonzero counts; "
          f"{topics} topics, {supers} super-topics")
    model, elbo = max((fit(data, topics, supers, sweeps, seed) for seed in range(restarts)), key=lambda r: r[1])
    print(f"{sweeps} CAVI sweeps x {restarts} restart(s), best ELBO {elbo:.1f}")
    H, W1, W2 = model[0].H.numpy(), model[0].W.numpy(), model[1].W.numpy()  # posterior means
    words = W2 @ W1  # (words, super-topics)
    share = H.sum(0) * words.sum(0)
    result = []
    for s in np.argsort(-share):
        top = vocab[np.argsort(-words[:, s])[:8]]
        mix = W1[:, s] * W2.sum(0)  # expected words from each topic
        main = np.argsort(-mix)[:2]
        print(f"super-topic {s} ({share[s] / share.sum():5.1%}): {' '.join(top)}")
        result.append({"super_topic": int(s), "share": float(share[s] / share.sum()), "top_words": top.tolist(),
                       "topics": []})
        for k in main:
            words_k = vocab[np.argsort(-W2[:, k])[:6]]
            print(f"    topic {k:2d} ({mix[k] / mix.sum():5.1%}): {' '.join(words_k)}")
            result[-1]["topics"].append({"topic": int(k), "share": float(mix[k] / mix.sum()),
                                         "top_words": words_k.tolist()})
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "deep_topics.json")
        with open(path, "w") as fh:
            json.dump({"shape": list(X.shape), "elbo": elbo, "super_topics": result}, fh, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
