"""Consensus NMF and rank selection on handwritten digits, as cNMF does it for single cells.

scikit-learn ships the UCI digits (1797 images of 8x8 pixels, grey levels 0-16: a small count
matrix). :class:`torchnmf.consensus.ConsensusNMF` fits many random restarts at each rank,
clusters their parts into consensus parts and scores each rank: stability (silhouette of the
clustering) should be high and the error should stop falling at a good rank. The script
prints the k-selection table, the rank of highest stability, and saves the k-selection plot,
the clustering of that rank and its consensus parts as PNG images.

Run::

    python examples/consensus_digits.py            # ranks 5..12, 50 restarts each
    python examples/consensus_digits.py --quick    # ranks 4..6, 6 restarts (CI)
"""
import argparse
import os

import numpy as np
from sklearn.datasets import load_digits

from torchnmf.consensus import ConsensusNMF


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--out", default="out/examples", help="folder for the PNG files")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    ranks = [4, 5, 6] if args.quick else list(range(5, 13))
    replicates = 6 if args.quick else 50

    digits = load_digits()
    X = digits.data.astype(int)  # (1797, 64) counts: 'auto' preparation runs (all 64 pixels kept)
    names = [f"px{r}{c}" for r in range(8) for c in range(8)]
    est = ConsensusNMF(ranks, n_replicates=replicates, beta_loss="frobenius", max_iter=200 if args.quick else 1000,
                       random_state=0, device=args.device)
    est.fit(X, feature_names=names)
    table = est.k_selection_
    print(f"digits {X.shape}: ranks {ranks}, {replicates} restarts each")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best = int(table["k"][int(np.argmax(table["stability"]))])
    print(f"most stable rank: {best}; its parts' top pixels: {est.top_features(best, n=3)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    files = []
    for name, fig in (("consensus_k_selection.png", est.plot_k_selection()),
                      ("consensus_clustering.png", est.plot_clustering(best))):
        files.append(os.path.join(args.out, name))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    comps = np.zeros((best, 64))
    comps[:, est.features_] = est.components_[best]  # back to the 64 pixels (all kept here)
    fig, axes = plt.subplots(1, best, figsize=(1.5 * best, 1.8), squeeze=False)
    for ax, part, share in zip(axes[0], comps, est.usages_[best].sum(0) / est.usages_[best].sum()):
        ax.imshow(part.reshape(8, 8), cmap="gray_r")
        ax.set_title(f"{100 * share:.0f}% of usage", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"consensus parts at rank {best}")
    fig.tight_layout()
    files.append(os.path.join(args.out, "consensus_parts.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    print("wrote " + ", ".join(files))


if __name__ == "__main__":
    main()
