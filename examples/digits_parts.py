"""Parts-based decomposition of handwritten digits with beta-divergence NMF.

scikit-learn ships the UCI digits (1797 images of 8x8 pixels, grey levels 0-16). NMF with a
KL divergence writes every image as a non-negative sum of a few non-negative "parts"
(strokes); this script fits :class:`torchnmf.estimators.BetaNMF`, prints the fit and the
sparsity of the parts, and saves the parts and a few reconstructions as PNG images.

Run::

    python examples/digits_parts.py              # rank 16, 300 iterations
    python examples/digits_parts.py --quick      # rank 8, 30 iterations (CI)
"""
import argparse
import os

import numpy as np
import torch
from sklearn.datasets import load_digits

from torchnmf.estimators import BetaNMF
from torchnmf.metrics import sparseness


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--out", default="out/examples", help="folder for the PNG files")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    rank = args.rank or (8 if args.quick else 16)
    max_iter = 30 if args.quick else 300

    digits = load_digits()
    X = digits.data  # (1797, 64) counts 0..16
    est = BetaNMF(n_components=rank, beta_loss="kullback-leibler", init="nndsvda", max_iter=max_iter,
                  tol=1e-5, random_state=0, device=args.device)
    H = est.fit_transform(X)  # (1797, rank) activations
    W = est.components_  # (rank, 64) parts
    print(f"digits {X.shape}: rank {rank}, {est.n_iter_} iterations, "
          f"KL divergence {est.reconstruction_err_:.1f} (per entry {est.reconstruction_err_ / X.size:.3f})")
    hoyer = [float(sparseness(torch.as_tensor(w))) for w in W]
    print(f"Hoyer sparseness of the parts: mean {np.mean(hoyer):.2f} (0 = flat, 1 = one pixel)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    order = np.argsort(-H.sum(0))
    cols = 8
    rows = int(np.ceil(rank / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, order):
        ax.imshow(W[k].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"part {k}", fontsize=8)
    fig.suptitle("NMF parts of the digits (KL divergence)")
    fig.tight_layout()
    parts_png = os.path.join(args.out, "digits_parts.png")
    fig.savefig(parts_png, dpi=100)
    plt.close(fig)

    recon = est.inverse_transform(H[:8])
    fig, axes = plt.subplots(2, 8, figsize=(11, 3))
    for i in range(8):
        axes[0, i].imshow(X[i].reshape(8, 8), cmap="gray_r")
        axes[1, i].imshow(recon[i].reshape(8, 8), cmap="gray_r")
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("data", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    recon_png = os.path.join(args.out, "digits_reconstructions.png")
    fig.savefig(recon_png, dpi=100)
    plt.close(fig)
    print(f"wrote {parts_png} and {recon_png}")


if __name__ == "__main__":
    main()
