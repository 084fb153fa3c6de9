"""Drum-loop spectrogram decomposition with convolutive NMF (NMFD).

pygame ships a short house-music loop (``pygame/examples/data/house_lo.wav``, 7 s at
11025 Hz). Its magnitude spectrogram ``V`` (frequencies x frames) is modelled as a sum of
``R`` time-frequency patterns ``W_r`` (frequencies x ``T`` frames), each played at the
onsets given by its activation row ``H_r``:

.. math:: V_{f,n} \\approx \\sum_r \\sum_{\\tau < T} W_{f,r,\\tau} H_{r, n-\\tau}

fitted with the :class:`torchnmf.nmf.NMFD` layer and KL multiplicative updates. The script
prints where each pattern sits in frequency and saves the spectrogram, the patterns and the
activations to a PNG.

Run::

    python examples/audio_nmfd.py            # whole loop, 4 patterns of 12 frames, 200 updates
    python examples/audio_nmfd.py --quick    # first 2 seconds, 30 updates (CI)
"""
import argparse
import importlib.util
import os

import numpy as np
import scipy.io.wavfile
import torch

from torchnmf.nmf import NMFD


def load_loop():
    """The loop as float samples in [-1, 1] and its sample rate, read from pygame's package data."""
    spec = importlib.util.find_spec("pygame")  # found without importing pygame (no SDL start-up)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example reads a recording shipped with pygame: pip install pygame")
    path = os.path.join(spec.submodule_search_locations[0], "examples", "data", "house_lo.wav")
    rate, x = scipy.io.wavfile.read(path)
    x = x.astype(np.float64)
    if x.ndim == 2:
        x = x.mean(1)
    x = (x - 128.0) / 128.0 if x.max() > 1.5 else x  # 8-bit wav is unsigned around 128
    return torch.from_numpy(x), rate, path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast setting for CI")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--T", type=int, default=12, help="pattern length in frames")
    p.add_argument("--out", default="out/examples")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    x, rate, path = load_loop()
    if args.quick:
        x = x[: 2 * rate]
    n_fft, hop = 512, 128
    S = torch.stft(x, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft, dtype=x.dtype),
                   return_complex=True).abs()  # (257 frequencies, frames)
    V = S[None]  # (1, F, L): one "sample", F channels, L frames
    print(f"{os.path.basename(path)}: {x.numel() / rate:.1f} s at {rate} Hz -> spectrogram {tuple(S.shape)}")

    net = NMFD(V.shape, rank=args.rank, T=args.T).double()
    n_iter = net.fit(V, beta=1, max_iter=30 if args.quick else 200, tol=1e-6)
    with torch.no_grad():
        R = net()
    kl = float((torch.xlogy(V, V) - torch.xlogy(V, R.clamp_min(1e-12)) - V + R).sum())
    print(f"NMFD rank {args.rank}, T = {args.T}: {n_iter} iterations, KL divergence {kl:.1f}, "
          f"relative error {float((V - R).norm() / V.norm()):.3f}")

    W = net.W.detach()  # (F, R, T) patterns
    H = net.H.detach()[0]  # (R, L - T + 1) activations
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    for r in range(args.rank):
        spectrum = W[:, r].sum(1).numpy()
        centroid = float((freqs * spectrum).sum() / max(spectrum.sum(), 1e-12))
        onsets = int((H[r] > H[r].mean() + 2 * H[r].std()).sum())
        print(f"pattern {r}: spectral centroid {centroid:7.0f} Hz, {onsets} strong activations")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig = plt.figure(figsize=(12, 7))
    grid = fig.add_gridspec(3, args.rank)
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(np.log1p(S.numpy()), origin="lower", aspect="auto", cmap="magma")
    ax.set_title("log magnitude spectrogram")
    for r in range(args.rank):
        a = fig.add_subplot(grid[1, r])
        a.imshow(np.log1p(W[:, r].numpy()), origin="lower", aspect="auto", cmap="magma")
        a.set_title(f"pattern {r}", fontsize=9)
        a.set_xticks([])
    ax = fig.add_subplot(grid[2, :])
    for r in range(args.rank):
        ax.plot(H[r].numpy() / max(float(H[r].max()), 1e-12) + r, lw=0.8)
    ax.set_title("activations (scaled, offset)")
    ax.set_xlabel("frame")
    fig.tight_layout()
    out = os.path.join(args.out, "audio_nmfd.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
