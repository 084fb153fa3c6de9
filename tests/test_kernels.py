"""Fused Triton kernels vs the generic path and slow numpy references.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set per test by the
``interpret`` fixture; the kernels are jitted lazily per mode so this works whenever
torchnmf.kernels was imported). Shapes are tiny: the interpreter executes tiles via numpy.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# Triton fixes its interpreter mode when first imported: import it here with the variable
# set, then restore the environment so other test files are unaffected (the `interpret`
# fixture sets it again for each test of this file). If something imported triton earlier
# in this process (torch._dynamo does), or cuda is present (its tests need compiled
# kernels), the interpreter tests run in a child pytest without cuda instead.
_IN_PROCESS = not torch.cuda.is_available() and (
    "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1")
_saved = os.environ.get("TRITON_INTERPRET")
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")  # optional dependency, part of the `test` extra
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from torchnmf import kernels  # noqa: E402
from torchnmf.kernels import fused_mu, sparse  # noqa: E402
from torchnmf.updates import mu_update as generic_mu_update  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
BETAS = [0, 0.5, 1, 1.5, 2, 3]


@pytest.fixture
def interpret(monkeypatch):
    if not _IN_PROCESS:
        pytest.skip("triton was imported before this file without the interpreter: "
                    "test_interpreter_tests_in_child_process runs this test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_mu.interpreting()


@pytest.mark.skipif(_IN_PROCESS, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def _data(N=23, C=37, R=5, dtype=torch.float64, seed=0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(N, C, generator=g, dtype=dtype) + (0 if zeros else 0.1)
    if zeros:
        V[V < 0.4] = 0
    W = torch.rand(C, R, generator=g, dtype=dtype) + 0.1
    H = torch.rand(N, R, generator=g, dtype=dtype) + 0.1
    M = torch.rand(N, C, generator=g) > 0.3
    return V, W, H, M


def _np_stats(V, W, H, beta, M=None, eps=np.finfo(np.float32).eps):
    """Slow reference: numerator and denominator of the MU of H, entry by entry."""
    V, W, H = (np.asarray(t, dtype=np.float64) for t in (V, W, H))
    N, C = V.shape
    R = W.shape[1]
    num, den = np.zeros((N, R)), np.zeros((N, R))
    for n in range(N):
        for c in range(C):
            if M is not None and not M[n, c]:
                continue
            p = float(H[n] @ W[c])
            if beta < 2:
                p = max(p, eps)
            num[n] += V[n, c] * p ** (beta - 2) * W[c]
            den[n] += p ** (beta - 1) * W[c]
    return num, den


# --------------------------------------------------------------------------- dense fused kernel

@pytest.mark.parametrize("beta", [0, 1, 1.5, 3])
def test_stats_match_numpy_reference(interpret, beta):
    V, W, H, M = _data(N=9, C=21, R=3)
    for mask in (None, M):
        num, den, _ = fused_mu.mu_stats(V, W, H, beta, mask=mask, eps_num=1.2e-7, eps_den=1.2e-7,
                                        n_split=2)
        rn, rd = _np_stats(V, W, H, beta, None if mask is None else mask.numpy())
        np.testing.assert_allclose(num.numpy(), rn, rtol=1e-12)
        np.testing.assert_allclose(den.numpy(), rd, rtol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_generic(interpret, beta, masked):
    V, W, H, M = _data()
    mask = M if masked else None
    before = [t.clone() for t in (V, W, H, M)]
    kw = dict(beta=beta, mask=mask, l1=0.05, l2=0.1, with_loss=True)
    H_f, loss_f = kernels.mu_update(V, W, H, **kw)
    H_g, loss_g = generic_mu_update(V, W, H, **kw)
    torch.testing.assert_close(H_f, H_g, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_f, loss_g, rtol=1e-12, atol=0)
    # the W update reads V.T through its strides, no copy
    Wm = None if mask is None else mask.T
    W_f = kernels.mu_update(V.T, H_f, W, beta=beta, mask=Wm, gamma=0.7)
    W_g = generic_mu_update(V.T, H_g, W, beta=beta, mask=Wm, gamma=0.7)
    torch.testing.assert_close(W_f, W_g, rtol=1e-12, atol=0)
    for t, b in zip((V, W, H, M), before):  # nothing the caller passed is modified
        assert torch.equal(t, b)


def test_iterations_monotone_and_equal_to_generic(interpret):
    V, W, H, _ = _data(N=20, C=24, R=4, seed=3)
    Wf, Hf, Wg, Hg = W, H, W, H
    losses = []
    for _ in range(10):
        Hf, loss = kernels.mu_update(V, Wf, Hf, beta=1, with_loss=True)
        Wf = kernels.mu_update(V.T, Hf, Wf, beta=1)
        Hg = generic_mu_update(V, Wg, Hg, beta=1)
        Wg = generic_mu_update(V.T, Hg, Wg, beta=1)
        losses.append(float(loss))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]
    torch.testing.assert_close(Hf, Hg, rtol=1e-10, atol=0)
    torch.testing.assert_close(Wf, Wg, rtol=1e-10, atol=0)


def test_out_and_fp32_and_split(interpret):
    V, W, H, M = _data(dtype=torch.float32, seed=1)
    ref = generic_mu_update(V, W, H, beta=0.5, mask=M)
    out = torch.empty_like(H)
    res = kernels.mu_update(V, W, H, beta=0.5, mask=M, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)
    for n_split in (1, 3):
        num, _, _ = fused_mu.mu_stats(V, W, H, 1, need_den=False, n_split=n_split, eps_num=1e-7)
        ref_num = (V / (H @ W.T).clamp_min(1e-7)) @ W
        torch.testing.assert_close(num, ref_num, rtol=2e-5, atol=1e-6)


def test_strided_and_half_input(interpret):
    V, W, H, _ = _data(N=30, C=40)
    Vs = V[::2, 1::2]  # non-contiguous, strides (2C, 2)
    Ws, Hs = W[1::2], H[::2]
    torch.testing.assert_close(kernels.mu_update(Vs, Ws, Hs), generic_mu_update(Vs.contiguous(), Ws, Hs),
                               rtol=1e-12, atol=0)
    # fp16 data with fp32 factors: converted in registers, same as the fp32 data
    V16, W32, H32 = V.half(), W.float(), H.float()
    ref = generic_mu_update(V16.float(), W32, H32, beta=1.5)
    torch.testing.assert_close(kernels.mu_update(V16, W32, H32, beta=1.5), ref, rtol=2e-5, atol=1e-6)
    # a rank that is not a power of two, and an empty matrix
    V, W, H, _ = _data(N=5, C=3, R=19)
    torch.testing.assert_close(kernels.mu_update(V, W, H), generic_mu_update(V, W, H), rtol=1e-12, atol=0)


def test_precision_setting(interpret):
    V, W, H, _ = _data()
    previous = kernels.set_precision("tf32")
    try:
        assert kernels._default_precision(V.device) == "tf32"
        # the interpreter computes in numpy whatever the precision; the argument is accepted
        torch.testing.assert_close(kernels.mu_update(V.float(), W.float(), H.float()),
                                   generic_mu_update(V.float(), W.float(), H.float()), rtol=2e-5, atol=1e-6)
    finally:
        kernels.set_precision(previous)
    assert kernels._default_precision(V.device) == "ieee"


def test_large_rank_and_half_factors_fall_back_to_generic(interpret):
    V, W, H, _ = _data(N=4, C=6, R=kernels.MAX_RANK + 1)
    torch.testing.assert_close(kernels.mu_update(V, W, H, beta=1.5), generic_mu_update(V, W, H, beta=1.5),
                               rtol=0, atol=0)
    V, W, H = (t.bfloat16() for t in _data(N=8, C=6, R=3)[:3])
    torch.testing.assert_close(kernels.mu_update(V, W, H), generic_mu_update(V, W, H), rtol=0, atol=0)


def test_supports(interpret, monkeypatch):
    V, W, H, M = _data()
    assert kernels.available()
    assert kernels.supports(V, 1) and kernels.supports(V, 0.5, M) and kernels.supports(V, 2, M)
    assert not kernels.supports(V, 2)  # Gram form of the generic path is already one read of V
    assert kernels.supports(V.to_sparse_csr(), 1)
    assert not kernels.supports(V.to_sparse_csr(), 1.5)
    assert not kernels.supports(V, float("nan"))
    assert not kernels.supports(V.long(), 1)
    assert not kernels.supports(V, 1, M[:3])
    assert not kernels.supports(V.numpy(), 1)
    with kernels.disabled():
        assert not kernels.supports(V, 1)
    assert kernels.supports(V, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.supports(V, 1)  # cpu tensors need the interpreter


def test_bad_input(interpret, monkeypatch):
    V, W, H, M = _data()
    with pytest.raises(TypeError, match="W and H must have one dtype"):
        kernels.mu_update(V, W.float(), H)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.mu_update(V, W.long(), H.long())
    with pytest.raises(TypeError, match="V must be float16"):
        kernels.mu_update(V.long(), W, H)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.mu_update(V, W[:-1], H)
    with pytest.raises(ValueError, match="mask has shape"):
        kernels.mu_update(V, W, H, mask=M[:, :-1])
    # a model on another device than the data: named, before any work ('meta' stands in for cuda)
    with pytest.raises(ValueError, match="V is on cpu but W is on meta"):
        kernels.mu_update(V, W.to("meta"), H)
    with pytest.raises(ValueError, match="V is on cpu but mask is on meta"):
        kernels.mu_update(V, W, H, mask=M.to("meta"))
    with pytest.raises(ValueError, match="precision"):
        kernels.mu_update(V, W, H, precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        kernels.set_precision("half")
    with pytest.raises(ValueError, match="beta"):
        kernels.mu_update(V, W, H, beta=float("inf"))
    with pytest.raises(ValueError, match="sparse V"):
        kernels.mu_update(V.to_sparse_csr(), W, H, beta=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need cuda tensors"):
        kernels.mu_update(V, W, H)


# --------------------------------------------------------------------------- sparse kernels

def _np_softmax_stats(D, A, B):
    N, C = D.shape
    rs, cs, lse = np.zeros(A.shape), np.zeros(B.shape), 0.0
    for n in range(N):
        for c in range(C):
            x = D[n, c]
            if x == 0:
                continue
            s = A[n] + B[c]
            m = s.max()
            l = m + np.log(np.exp(s - m).sum())
            phi = np.exp(s - l)
            rs[n] += x * phi
            cs[c] += x * phi
            lse += x * l
    return rs, cs, lse


def test_sparse_numerator_and_update(interpret):
    V, W, H, _ = _data(N=19, C=26, R=5, zeros=True)
    V[4] = 0  # an empty row
    S = V.to_sparse_csr()
    eps = np.finfo(np.float32).eps
    ref = (V.numpy() / np.maximum(H.numpy() @ W.numpy().T, eps)) @ W.numpy()
    for backend in ("torch", "triton"):
        for chunk in (7, 1 << 20):
            num, nz = sparse.nonzero_mu_numerator(S, W, H, eps=eps, chunk_size=chunk, backend=backend,
                                                  with_loss=True)
            np.testing.assert_allclose(num.numpy(), ref, rtol=1e-12)
    # the fused update on CSR equals the generic (dense) path, incl. the loss
    H_f, loss_f = kernels.mu_update(S, W, H, beta=1, l2=0.1, with_loss=True)
    H_g, loss_g = generic_mu_update(V, W, H, beta=1, l2=0.1, with_loss=True)
    torch.testing.assert_close(H_f, H_g, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_f, loss_g, rtol=1e-12, atol=0)
    # COO input is converted; fp32 factors accumulate in fp32
    num32 = sparse.nonzero_mu_numerator(V.float().to_sparse(), W.float(), H.float(), eps=eps,
                                        backend="triton")
    assert num32.dtype == torch.float32
    np.testing.assert_allclose(num32.numpy(), ref, rtol=1e-5)


def test_softmax_stats_match_numpy(interpret):
    g = torch.Generator().manual_seed(5)
    D = torch.poisson(torch.rand(17, 23, generator=g, dtype=torch.float64) * 1.5)
    D[:, 2] = 0
    D[6] = 0
    A = torch.randn(17, 6, generator=g, dtype=torch.float64)
    B = torch.randn(23, 6, generator=g, dtype=torch.float64)
    rs_ref, cs_ref, lse_ref = _np_softmax_stats(D.numpy(), A.numpy(), B.numpy())
    S = D.to_sparse_csr()
    for backend in ("torch", "triton"):
        for chunk in (5, 1 << 20):
            rs, cs, lse = sparse.nonzero_softmax_stats(S, A, B, chunk_size=chunk, backend=backend)
            np.testing.assert_allclose(rs.numpy(), rs_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(cs.numpy(), cs_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(float(lse), lse_ref, rtol=1e-12)
    # no nonzeros at all: zeros, not NaN
    E = torch.zeros(17, 23, dtype=torch.float64).to_sparse_csr()
    for backend in ("torch", "triton"):
        rs, cs, lse = sparse.nonzero_softmax_stats(E, A, B, backend=backend)
        assert not rs.any() and not cs.any() and float(lse) == 0
    # half-precision log-weights accumulate in fp32
    rs, cs, lse = sparse.nonzero_softmax_stats(D.float().to_sparse_csr(), A.half(), B.half(), backend="triton")
    assert rs.dtype == torch.float32
    np.testing.assert_allclose(rs.numpy(), rs_ref, rtol=5e-3, atol=5e-3)


def test_sparse_bad_input(interpret):
    V, W, H, _ = _data(zeros=True)
    S = V.to_sparse_csr()
    with pytest.raises(TypeError, match="V must be a torch sparse tensor"):
        sparse.nonzero_mu_numerator(V, W, H)
    with pytest.raises(ValueError, match="shapes do not match"):
        sparse.nonzero_softmax_stats(S, H, H)
    with pytest.raises(ValueError, match="V is on cpu but W is on meta"):
        sparse.nonzero_mu_numerator(S, W.to("meta"), H)
    with pytest.raises(ValueError, match="chunk_size"):
        sparse.nonzero_softmax_stats(S, H, W, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        sparse.nonzero_softmax_stats(S, H, W, backend="numba")


# --------------------------------------------------------------------------- real compiler

_COMPILE = r"""
import itertools, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton._C.libtriton import ir
from torchnmf.kernels import fused_mu, sparse

target = GPUTarget("cuda", 90, 32)  # H100; no GPU is needed to compile
backend = make_backend(target)


def source(fn, sig, consts):
    full = dict(sig)
    full.update({k: "constexpr" for k in consts})
    return ASTSource(triton.jit(fn), full, consts)


def ttir(fn, sig, consts, **opts):
    options = backend.parse_options(opts)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    source(fn, sig, consts).make_ir(target, options, backend.get_codegen_implementation(options),
                                    backend.get_module_map(), ctx)


n = 0
for dt in ("fp32", "fp64"):
    p = "*" + dt
    sig = dict(V="*fp16" if dt == "fp32" else p, H=p, W=p, M="*u8", NUM=p, DEN=p, LOSS=p,
               **{k: "i32" for k in ("n_rows", "n_cols", "rank", "cols_per_split", "s_vn", "s_vc",
                                     "s_hn", "s_hr", "s_wc", "s_wr", "s_mn", "s_mc", "s_os", "s_on",
                                     "s_or")},
               beta="fp32", eps_num="fp32", eps_den="fp32")
    # every beta mode with all options off and all on (fp64: two modes)
    modes = range(4) if dt == "fp32" else (0, 3)
    for mode, on in itertools.product(modes, (False, True)):
        consts = dict(BETA_MODE=mode, HAS_MASK=on, NEED_DEN=on, WANT_LOSS=on, BLOCK_N=64,
                      BLOCK_C=64, BLOCK_R=64, PRECISION="tf32" if on and dt == "fp32" else "ieee")
        ttir(fused_mu._mu_stats_kernel, sig, consts)
        n += 1
    for f64 in (False, True):
        t = "fp64" if f64 else "fp32"
        sig = dict(CROW="*i64", COL="*i64", VAL="*" + t, H="*fp16", W="*fp16", NUM="*" + t, LOSS="*" + t,
                   R="i32", s_hn="i32", s_hr="i32", s_wc="i32", s_wr="i32", s_on="i32", eps="fp32")
        ttir(sparse._csr_ratio_kernel, sig, dict(WANT_LOSS=f64, ACC_F64=f64, BLOCK_Z=32, BLOCK_R=64))
        sig = dict(CROW="*i64", COL="*i64", VAL="*" + t, A="*" + t, B="*" + t, ROWS="*" + t, COLS="*" + t,
                   LSE="*" + t, K="i32", s_an="i32", s_ak="i32", s_bc="i32", s_bk="i32", s_rn="i32",
                   s_cc="i32")
        ttir(sparse._csr_softmax_kernel, sig, dict(ACC_F64=f64, BLOCK_Z=32, BLOCK_K=32))
        n += 2
# the main path through every stage down to a cubin (ptxas ships with triton)
sig = dict(V="*fp32", H="*fp32", W="*fp32", M="*u8", NUM="*fp32", DEN="*fp32", LOSS="*fp32",
           **{k: "i32" for k in ("n_rows", "n_cols", "rank", "cols_per_split", "s_vn", "s_vc", "s_hn",
                                 "s_hr", "s_wc", "s_wr", "s_mn", "s_mc", "s_os", "s_on", "s_or")},
           beta="fp32", eps_num="fp32", eps_den="fp32")
consts = dict(BETA_MODE=0, HAS_MASK=False, NEED_DEN=False, WANT_LOSS=False, BLOCK_N=64, BLOCK_C=64,
              BLOCK_R=64, PRECISION="ieee")
k = triton.compile(source(fused_mu._mu_stats_kernel, sig, consts), target=target,
                   options=dict(num_warps=4, num_stages=3))
assert k.asm["cubin"]
print("compiled", n + 1)
"""


def test_kernels_compile_for_h100():
    # The interpreter does not run Triton's compiler; this does, in a fresh process (this one
    # imported triton in interpreter mode), for sm_90 without needing a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------- without triton

def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, torchnmf\n"
        "from torchnmf import kernels\n"
        "from torchnmf.updates import mu_update\n"
        "assert not kernels.available() and not kernels.supports(torch.rand(3, 4), 1)\n"
        "V = torch.rand(6, 5); W = torch.rand(5, 2); H = torch.rand(6, 2)\n"
        "assert mu_update(V, W, H).shape == (6, 2)\n"
        "try:\n    kernels.mu_update(V, W, H)\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# --------------------------------------------------------------------------- cuda

@cuda
@pytest.mark.parametrize("beta", [0.5, 1, 1.5, 2])
def test_cuda_dispatch_equals_generic(beta):
    V, W, H, M = _data(N=300, C=200, R=12, dtype=torch.float32)
    Vc, Wc, Hc, Mc = (t.cuda() for t in (V, W, H, M))
    for mask, maskc in ((None, None), (M, Mc)):
        fused = kernels.supports(Vc, beta, maskc)
        assert fused == (beta != 2 or mask is not None)
        # updates.mu_update dispatches to the fused kernel on cuda
        H_f, loss_f = generic_mu_update(Vc, Wc, Hc, beta=beta, mask=maskc, with_loss=True)
        H_c, loss_c = generic_mu_update(V, W, H, beta=beta, mask=mask, with_loss=True)
        torch.testing.assert_close(H_f.cpu(), H_c, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss_f.cpu(), loss_c, rtol=1e-5, atol=0)
        Mt, Mtc = (None, None) if mask is None else (M.T, Mc.T)
        W_f = generic_mu_update(Vc.T, H_f, Wc, beta=beta, mask=Mtc)
        W_c = generic_mu_update(V.T, H_c, W, beta=beta, mask=Mt)
        torch.testing.assert_close(W_f.cpu(), W_c, rtol=1e-4, atol=1e-6)
    for precision in ("ieee", "tf32x3", "tf32"):  # tf32 is lossy: ~1e-3 per update
        H_p = kernels.mu_update(Vc, Wc, Hc, beta=beta, mask=Mc, precision=precision)
        tol = 3e-3 if precision == "tf32" else 1e-4
        torch.testing.assert_close(H_p.cpu(), generic_mu_update(V, W, H, beta=beta, mask=M), rtol=tol, atol=1e-6)


@cuda
def test_cuda_sparse_and_device_mismatch():
    V, W, H, _ = _data(N=200, C=150, R=8, dtype=torch.float32, zeros=True)
    S = V.cuda().to_sparse_csr()
    torch.testing.assert_close(kernels.mu_update(S, W.cuda(), H.cuda()).cpu(), generic_mu_update(V, W, H),
                               rtol=1e-4, atol=1e-6)
    A, B = torch.randn(200, 20), torch.randn(150, 20)
    out_t = sparse.nonzero_softmax_stats(S, A.cuda(), B.cuda(), backend="triton")
    out_c = sparse.nonzero_softmax_stats(V.to_sparse_csr(), A, B, backend="torch")
    for a, b in zip(out_t, out_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="V is on cuda:0 but W is on cpu"):
        kernels.mu_update(V.cuda(), W, H.cuda())
