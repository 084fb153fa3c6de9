"""GPU speed of NMF multiplicative updates and of the Gamma-Poisson nonzero sweep.

Run on one cuda GPU (H100/H200 for the issue's figures)::

    python benchmarks/gpu.py                      # fp32, V 100000x10000, rank 64, 100 iterations
    python benchmarks/gpu.py --rows 20000 --iters 20 --nnz 10000000   # quicker
    python benchmarks/gpu.py --tune               # also try launch configurations of the fused kernel

Prints, in one run and from the same initial factors:

* the bandwidth of a plain device-to-device copy of V (read + write), and the
  "one read of V per factor update" floor it implies (2 reads of V per iteration);
* ms/iteration (an update of H then of W) of the generic path (torchnmf.updates with the
  fused kernels disabled) and of the dispatched path (fused Triton kernel where
  :func:`torchnmf.kernels.supports` says so; the Gram form for beta=2 without mask), the
  fraction of the floor reached, and the final beta-divergence of each after the same
  iterations (evaluated by the same generic code);
* Gamma-Poisson: seconds per CAVI sweep (torchnmf.trainer.CAVI) at ``--nnz`` nonzeros and
  K=``--K``, and the time of one pass of nonzero statistics by the fused Triton kernel
  (:func:`torchnmf.kernels.sparse.nonzero_softmax_stats`) beside the layer's own
  :func:`torchnmf.poisson.gamma.expected_counts`, with their largest relative difference.

Timings use cuda events after warm-up iterations (which also compile the kernels).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1 and tiny sizes) only smoke-tests this script


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _ms(fn, reps: int) -> float:
    if DEVICE != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second of ``y.copy_(x)`` counting the read and the write."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    y = torch.empty_like(x)
    y.copy_(x)
    ms = _ms(lambda: y.copy_(x), 20)
    return 2 * nbytes / (ms / 1e3)


def nmf_rows(args, floor_ms):
    from torchnmf import kernels
    from torchnmf.updates import mu_update

    N, C, R = args.rows, args.cols, args.rank
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # a non-negative V with low-rank structure plus noise, as in a real fit
    V = torch.rand(N, R, device=DEVICE, generator=g) @ torch.rand(R, C, device=DEVICE, generator=g)
    V.add_(torch.rand(N, C, device=DEVICE, generator=g), alpha=0.1 * R / 4)
    W0 = torch.rand(C, R, device=DEVICE, generator=g)
    H0 = torch.rand(N, R, device=DEVICE, generator=g)
    mask = torch.rand(N, C, device=DEVICE, generator=g) > 0.1 if args.mask else None

    def run(beta, M, iters):
        W, H = W0.clone(), H0.clone()
        Mt = None if M is None else M.t()
        cV, cT = {}, {}  # the generic path's buffers, kept across calls as NMF.fit does

        def one():
            nonlocal W, H
            H = mu_update(V, W, H, beta=beta, mask=M, out=H, cache=cV)
            W = mu_update(V.t(), H, W, beta=beta, mask=Mt, out=W, cache=cT)

        for _ in range(2):  # warm-up (compiles the kernel) from a copy, so both paths see the same start
            one()
        W, H = W0.clone(), H0.clone()
        ms = _ms(one, iters)
        with kernels.disabled():  # one evaluator for both paths
            _, loss = mu_update(V, W, H, beta=beta, mask=M, with_loss=True)
        return ms, float(loss)

    cases = [(b, None) for b in args.betas]
    if mask is not None:
        cases += [(b, mask) for b in args.betas]
    print(f"\nNMF multiplicative updates, fp32, V {N}x{C}, rank {R}, {args.iters} iterations "
          f"(floor = 2 reads of V per iteration = {floor_ms:.2f} ms)")
    head = f"{'beta':>5} {'mask':>5} {'generic ms/it':>14} {'fused ms/it':>12} {'speed-up':>9} " \
           f"{'floor/fused':>12} {'div generic':>14} {'div fused':>14} {'rel diff':>9}  path"
    print(head)
    print("-" * len(head))
    for beta, M in cases:
        fused = kernels.supports(V, beta, M)
        with kernels.disabled():
            ms_g, div_g = run(beta, M, args.iters)
        ms_f, div_f = run(beta, M, args.iters)
        path = "fused triton" if fused else "generic (Gram form)" if beta == 2 else "generic"
        floor = floor_ms * (1.25 if M is not None else 1)  # a bool mask adds a quarter of V's bytes
        print(f"{beta:5g} {'yes' if M is not None else 'no':>5} {ms_g:14.2f} {ms_f:12.2f} {ms_g / ms_f:9.2f} "
              f"{floor / ms_f:12.2f} {div_g:14.6e} {div_f:14.6e} {abs(div_f - div_g) / abs(div_g):9.1e}  {path}")
    if args.tune:
        tune(V, W0, H0)


def tune(V, W, H):
    from torchnmf import kernels
    from torchnmf.kernels.fused_mu import mu_stats

    prec = kernels._default_precision(V.device)

    print("\nlaunch configurations of the fused kernel, beta=1 (ms per H update + W update):")
    best = None
    for bn, bc, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        cfg = (bn, bc, warps, stages)
        try:
            def one():
                mu_stats(V, W, H, 1.0, eps_num=1.2e-7, need_den=False, config=cfg, precision=prec)
                mu_stats(V.t(), H, W, 1.0, eps_num=1.2e-7, need_den=False, config=cfg, precision=prec)

            one()
            ms = _ms(one, 5)
        except Exception as err:  # out of shared memory / registers for this configuration
            print(f"  {cfg}: failed ({type(err).__name__})")
            continue
        print(f"  {cfg}: {ms:.2f}")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best:
        print(f"best: {best[1]} at {best[0]:.2f} ms (pass it as mu_stats(config=...) / edit _config)")


def poisson_rows(args):
    from torchnmf.kernels.sparse import nonzero_softmax_stats
    from torchnmf.poisson.gamma import CountMatrix, GammaPoisson, expected_counts
    from torchnmf.trainer import CAVI

    nnz, K = args.nnz, args.K
    n_rows, n_cols = args.pf_rows, args.pf_cols
    g = torch.Generator(device=DEVICE).manual_seed(1)
    key = torch.randint(0, n_rows * n_cols, (int(nnz * 1.02),), device=DEVICE, generator=g)
    key = torch.unique(key)[:nnz]  # sorted, distinct (row, col) pairs
    rows, cols = key // n_cols, key % n_cols
    del key
    vals = 1 + torch.poisson(torch.full((rows.numel(),), 0.7, device=DEVICE), generator=g)
    data = CountMatrix(rows, cols, vals, (n_rows, n_cols))
    print(f"\nGamma-Poisson, fp32, {n_rows}x{n_cols}, {data.nnz / 1e6:.1f}M nonzeros, K={K}")
    layer = GammaPoisson(n_rows, n_cols, rank=K, device=DEVICE, dtype=torch.float32)
    trainer = CAVI(layer)
    trainer.step(lambda: data)  # warm-up
    _sync()
    t = time.perf_counter()
    for _ in range(args.sweeps):
        elbo = trainer.step(lambda: data)
    _sync()
    sweep = (time.perf_counter() - t) / args.sweeps
    print(f"CAVI sweep (torchnmf.trainer.CAVI, 2 passes over the nonzeros): {sweep * 1e3:.1f} ms; "
          f"ELBO {float(elbo.total):.6e}")

    with torch.no_grad():
        A, B = layer.log_mean_U(), layer.log_mean_alpha()
    V = torch.sparse_csr_tensor(data.crow, data.cols, data.values, data.shape, check_invariants=False)
    ms_layer = _ms(lambda: expected_counts(data, A, B), 3)
    ms_triton = _ms(lambda: nonzero_softmax_stats(V, A, B, backend="triton"), 3)
    ms_torch = _ms(lambda: nonzero_softmax_stats(V, A, B, backend="torch", chunk_size=1 << 24), 3)
    r1, c1, l1 = expected_counts(data, A, B)
    r2, c2, l2 = nonzero_softmax_stats(V, A, B, backend="triton")
    diff = max(float((r1 - r2).abs().max() / r1.abs().max()), float((c1 - c2).abs().max() / c1.abs().max()),
               abs(float(l1 - l2)) / abs(float(l1)))
    print("one pass of nonzero statistics (row sums, column sums, log normaliser):")
    print(f"  layer's expected_counts (SDDMM + 2 SpMM): {ms_layer:8.1f} ms")
    print(f"  fused triton kernel (one pass, atomics):  {ms_triton:8.1f} ms   max rel diff {diff:.1e}")
    print(f"  chunked torch gather/scatter:             {ms_torch:8.1f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=10_000)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 0.5])
    p.add_argument("--mask", action="store_true", help="also time each beta with a random mask")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in the generic and fused paths")
    p.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), default=None,
                   help="fp32 matmul precision of the fused kernel (default: automatic, tf32x3 on H100)")
    p.add_argument("--tune", action="store_true", help="time launch configurations of the fused kernel")
    p.add_argument("--nnz", type=int, default=100_000_000)
    p.add_argument("--pf-rows", type=int, default=1_000_000)
    p.add_argument("--pf-cols", type=int, default=200_000)
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--sweeps", type=int, default=3)
    p.add_argument("--skip-nmf", action="store_true")
    p.add_argument("--skip-poisson", action="store_true")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a cuda GPU (torch.cuda.is_available() is False); "
                 "nothing was measured.")
    from torchnmf import kernels

    if not kernels.available():
        sys.exit("benchmarks/gpu.py needs triton for the fused path: pip install 'torchnmf[gpu]'")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    kernels.set_precision(args.precision)
    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else DEVICE
    prec = kernels._default_precision(torch.device(DEVICE))
    print(f"device: {name}, torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}, "
          f"fused-kernel matmul precision {prec}")
    vbytes = args.rows * args.cols * 4
    bw = copy_bandwidth(min(vbytes, 4 << 30))
    floor_ms = 2 * vbytes / bw * 1e3
    print(f"plain copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")
    if not args.skip_nmf:
        nmf_rows(args, floor_ms)
    if not args.skip_poisson:
        poisson_rows(args)
    if DEVICE == "cuda":
        print(f"\npeak cuda memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
