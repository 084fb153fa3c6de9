import numpy as np
import pytest
import torch

from torchnmf.metrics import beta_div
from torchnmf.updates import EPSILON, mu_gamma, mu_update


BETAS = [0, 0.5, 1, 1.5, 2, 3]


def ref_mu(V, W, H, beta, M=None, l1=0.0, l2=0.0, eps=EPSILON):
    """Slow numpy reference: H <- H * ((M V WH^(b-2)) W / ((M WH^(b-1)) W + l1 + l2 H))^gamma."""
    V, W, H = (np.asarray(x, dtype=np.float64) for x in (V, W, H))
    M = np.ones_like(V) if M is None else np.asarray(M, dtype=np.float64)
    WH = H @ W.T
    if beta < 2:
        WH = np.maximum(WH, eps)
    num = (M * V * WH ** (beta - 2)) @ W
    den = (M * WH ** (beta - 1)) @ W + l1 + l2 * H
    den[den == 0] = eps
    g = 1 / (2 - beta) if beta < 1 else (1 / (beta - 1) if beta > 2 else 1)
    return H * (num / den) ** g


def problem(N=13, C=9, R=3, positive=True):
    V = torch.rand(N, C, dtype=torch.float64) + (0.1 if positive else 0.0)
    W = torch.rand(C, R, dtype=torch.float64)
    H = torch.rand(N, R, dtype=torch.float64)
    return V, W, H


def test_gamma():
    assert mu_gamma(0) == 0.5 and mu_gamma(0.5) == pytest.approx(1 / 1.5)
    assert mu_gamma(1) == mu_gamma(1.5) == mu_gamma(2) == 1
    assert mu_gamma(3) == 0.5


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked", [False, True])
def test_dense_matches_reference(beta, masked):
    V, W, H = problem()
    M = (torch.rand_like(V) > 0.3).double() if masked else None
    new = mu_update(V, W, H, beta, mask=M, l1=0.1, l2=0.2)
    ref = ref_mu(V, W, H, beta, None if M is None else M, l1=0.1, l2=0.2)
    np.testing.assert_allclose(new.numpy(), ref, rtol=1e-10)
    # W update by the transpose
    newW = mu_update(V.T, H, W, beta, mask=None if M is None else M.T)
    np.testing.assert_allclose(newW.numpy(), ref_mu(V.T, H, W, beta, None if M is None else M.T), rtol=1e-10)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked", [False, True])
def test_loss_is_divergence_at_input(beta, masked):
    V, W, H = problem()
    M = (torch.rand_like(V) > 0.3).double() if masked else None
    _, loss = mu_update(V, W, H, beta, mask=M, with_loss=True)
    pred = H @ W.T
    keep = torch.ones_like(V, dtype=torch.bool) if M is None else M.bool()
    assert float(loss) == pytest.approx(float(beta_div(pred[keep], V[keep], beta)), rel=1e-10)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("beta", [0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_equals_dense(layout, beta, masked):
    V, W, H = problem(positive=False)
    V[V < 0.6] = 0
    M = (torch.rand_like(V) > 0.3).double() if masked else None
    S = V.to_sparse() if layout == "coo" else V.to_sparse_csr()
    dense, ld = mu_update(V, W, H, beta, mask=M, l1=0.05, with_loss=True)
    sparse, ls = mu_update(S, W, H, beta, mask=M, l1=0.05, with_loss=True)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-14)
    assert float(ls) == pytest.approx(float(ld), rel=1e-10)
    assert S.layout != torch.strided  # never densified in place


def test_sparse_rejects_nonpositive_beta():
    V, W, H = problem()
    with pytest.raises(ValueError, match="beta"):
        mu_update(V.to_sparse(), W, H, beta=0)


def test_out_in_place_and_inputs_untouched():
    V, W, H = problem()
    V0, W0, H0 = V.clone(), W.clone(), H.clone()
    expect = mu_update(V, W, H, 1)
    assert torch.equal(H, H0) and torch.equal(V, V0) and torch.equal(W, W0)
    res = mu_update(V, W, H, 1, out=H)
    assert res.data_ptr() == H.data_ptr()
    torch.testing.assert_close(H, expect)


def test_cache_reuse_gives_same_result():
    V, W, H = problem()
    cache = {}
    for beta in (1,):
        a = mu_update(V, W, H, beta, cache=cache, with_loss=True)
        b = mu_update(V, W, H, beta, cache=cache, with_loss=True)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])


def test_shape_errors():
    V, W, H = problem()
    with pytest.raises(ValueError, match="shapes"):
        mu_update(V, W[:-1], H)
    with pytest.raises(ValueError, match="2-D"):
        mu_update(V[None], W, H)


def test_float32():
    V, W, H = (x.float() for x in problem())
    out = mu_update(V, W, H, 1)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_mu(V, W, H, 1), rtol=1e-4)


# ------------------------------------------------- sparse path: CSR kernels == the previous path
def prev_sparse_update(S, W, H, beta, M=None, l1=0.0, eps=EPSILON):
    """The sparse update as it was before the CSR kernels (issue 16), with its loss: rows of H
    and W gathered per non-zero and dotted, the numerator by a COO product."""
    C = S.to_sparse_coo().coalesce() if S.layout != torch.sparse_coo else S.coalesce()
    rows, cols = C.indices()
    vals = C.values()
    m = None if M is None else M[rows, cols]
    wh = (H[rows] * W[cols]).sum(1)
    whc = wh.clamp_min(eps) if beta < 2 else wh
    r = vals / whc if beta == 1 else (vals if beta == 2 else vals * whc.pow(beta - 2))
    if m is not None:
        r = r * m
    num = torch.sparse.mm(torch.sparse_coo_tensor(C.indices(), r, C.shape, check_invariants=False), W)
    Mf = torch.ones(C.shape, dtype=H.dtype) if M is None else M
    WH = H @ W.T
    WHc = WH.clamp_min(eps) if beta < 2 else WH
    den = (Mf * WHc.pow(beta - 1)) @ W + l1
    all_sum = (Mf * WHc.pow(beta)).sum()
    w = 1 if m is None else m
    if beta == 1:
        loss = (w * (torch.xlogy(vals, vals / whc) - vals)).sum() + all_sum
    elif beta == 2:
        loss = 0.5 * ((w * vals * vals).sum() - 2 * (w * vals * wh).sum() + all_sum)
    else:
        loss = ((w * vals.pow(beta)).sum() + (beta - 1) * all_sum
                - beta * (w * vals * whc.pow(beta - 1)).sum()) / (beta * (beta - 1))
    return H * (num / den) ** mu_gamma(beta), loss


def sparse_problem(N=40, C=31, R=4, density=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(N, C, dtype=torch.float64, generator=g)
    V[V > density] = 0
    V[3] = 0  # an empty row and an empty column
    V[:, 5] = 0
    W = torch.rand(C, R, dtype=torch.float64, generator=g)
    H = torch.rand(N, R, dtype=torch.float64, generator=g)
    return V * 10, W, H


@pytest.mark.parametrize("layout", ["coo", "uncoalesced", "csr", "csc"])
@pytest.mark.parametrize("beta", [1, 1.5, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_csr_path_equals_previous_path(layout, beta, masked):
    V, W, H = sparse_problem()
    M = (torch.rand(V.shape, generator=torch.Generator().manual_seed(1)) > 0.3).double() if masked else None
    if layout == "uncoalesced":  # every non-zero split into two halves: duplicates are summed
        C = V.to_sparse()
        S = torch.sparse_coo_tensor(C.indices().repeat(1, 2), torch.cat([C.values() / 2] * 2), V.shape)
    else:
        S = {"coo": V.to_sparse, "csr": V.to_sparse_csr, "csc": V.to_sparse_csc}[layout]()
    S0 = S.clone()
    for X, A, B, Mx in ((S, W, H, M), (V.T.to_sparse_csr(), H, W, None if M is None else M.T)):
        cache = {}
        for _ in range(2):  # the cached pattern gives the same result again
            new, loss = mu_update(X, A, B, beta, mask=Mx, l1=0.05, with_loss=True, cache=cache)
            ref, ref_loss = prev_sparse_update(X, A, B, beta, Mx, l1=0.05)
            torch.testing.assert_close(new, ref, rtol=1e-10, atol=0)
            assert float(loss) == pytest.approx(float(ref_loss), rel=1e-10)
        dense = mu_update(X.to_dense(), A, B, beta, mask=Mx, l1=0.05)
        torch.testing.assert_close(new, dense, rtol=1e-10, atol=0)
    assert S.layout == S0.layout and torch.equal(S.to_dense(), S0.to_dense())  # input untouched


def test_sparse_pattern_int32_indices_and_float32():
    from torchnmf.updates import _sparse_parts

    V, W, H = sparse_problem(N=60, C=50, R=5)
    cache = {}
    out = mu_update(V.float().to_sparse_csr(), W.float(), H.float(), 1, cache=cache)
    nz = cache["nz"]
    assert nz.crow.dtype == nz.col.dtype == torch.int32  # small shapes: int32 indices
    ref, _ = prev_sparse_update(V.to_sparse(), W, H, 1)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    # the reconstruction at the non-zeros, in row-major order
    nz64 = _sparse_parts(V.to_sparse(), None)
    rows, cols = V.to_sparse().indices()
    torch.testing.assert_close(nz64.dot(H, W), (H @ W.T)[rows, cols], rtol=1e-12, atol=0)
    torch.testing.assert_close(nz64.rows, rows)


def test_sparse_nan_in_V_stays_local():
    # a NaN in V reaches only its own row's update (the pattern's values are zeros, not V's)
    V, W, H = sparse_problem()
    V[0, V[0].nonzero()[0, 0]] = float("nan")
    out = mu_update(V.to_sparse_csr(), W, H, 1)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1:]).all()


def test_subnormal_denominator_is_zero_not_nan():
    # a zero entry of H whose denominator is subnormal (collapsing factors: 3.7e-315 was seen in a
    # Frobenius fit) gave 0 * inf = NaN; such a denominator is floored like an exact zero
    V = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 1e-200], [1e-200, 0.0]], dtype=torch.float64)
    H = torch.tensor([[0.0, 1e-120], [1.0, 1.0], [0.0, 1e-120]], dtype=torch.float64)
    assert 0 < float((H @ (W.T @ W))[0, 0]) < torch.finfo(torch.float64).tiny  # subnormal
    out = mu_update(V, W, H, beta=2)
    assert torch.isfinite(out).all() and out[0, 0] == 0 and out[2, 0] == 0
    torch.testing.assert_close(out[1], H[1] * (V[1] @ W) / (H[1] @ (W.T @ W)))


@pytest.mark.parametrize("beta", [0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_w_statistics_from_the_pattern_of_v_equal_dense(beta, masked):
    """OnlineMU's W statistics reuse the CSR pattern of V for Vᵀ (no COO transpose of the batch)."""
    from torchnmf.updates import mu_statistics

    V, W, H = sparse_problem()
    M = (torch.rand(V.shape, generator=torch.Generator().manual_seed(1)) > 0.3).double() if masked else None
    S = V.to_sparse_csr()
    cache = {}
    mu_update(S, W, H, beta, mask=M, cache=cache)  # builds the pattern of V, as the H updates do
    Mt = None if M is None else M.T
    for tcache in ({"nz": cache["nz"].transposed()}, None):  # the shared pattern, or one from the CSC view
        num, den, loss = mu_statistics(S.t(), H, W, beta, Mt, with_loss=True, cache=tcache)
        ref = mu_statistics(V.T.contiguous(), H, W, beta, Mt, with_loss=True)
        for a, b in zip((num, den, loss), ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert S.layout == torch.sparse_csr and torch.equal(S.to_dense(), V)


def test_w_numerator_through_the_transposed_pattern_any_dtype():
    from torchnmf.updates import _sparse_parts

    V, W, H = sparse_problem(N=40, C=30, R=4)
    nz = _sparse_parts(V.to_sparse_csr(), None)
    vals = torch.rand(nz.vals.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dense = torch.zeros(V.shape, dtype=torch.float64)
    dense[nz.rows, nz.col.long()] = vals
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        out = nz.tmm(vals.to(dtype), H.to(dtype))
        assert out.shape == (30, 4) and out.dtype == dtype
        torch.testing.assert_close(out.double(), dense.T @ H.to(dtype).double(), rtol=tol, atol=tol)


def test_csc_pattern_by_counting_equals_by_sorting():
    from torchnmf._csr import csc_pattern
    from torchnmf.updates import _sparse_parts

    V, _, _ = sparse_problem(N=50, C=20, R=2)
    nz = _sparse_parts(V.to_sparse_csr(), None)
    a = csc_pattern(nz.crow, nz.col, nz.shape, lambda: nz.rows, counting=True)
    b = csc_pattern(nz.crow, nz.col, nz.shape, lambda: nz.rows, counting=False)
    for x, y in zip(a, b):
        assert torch.equal(x.long(), y.long())
    ccol, rows, perm = a
    T = V.T.to_sparse_csr()
    assert torch.equal(ccol.long(), T.crow_indices()) and torch.equal(rows.long(), T.col_indices())
    assert torch.equal(nz.vals[perm.long()], T.values())


@pytest.mark.parametrize("beta", [0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_update_in_parts_equals_one_pass(monkeypatch, beta, masked, dtype):
    """A large sparse V is taken in parts of consecutive rows: the same update, statistics and loss."""
    import torchnmf.updates as updates
    from torchnmf.updates import mu_statistics

    V, W, H = sparse_problem(N=23, C=17, R=3)
    V[4] = 0  # an empty row inside a part
    M = (torch.rand(V.shape, generator=torch.Generator().manual_seed(1)) > 0.3).double() if masked else None
    S = V.to_sparse_csr()
    V, W, H, S = (t.to(dtype) for t in (V, W, H, S))
    M = None if M is None else M.to(dtype)
    Mt = None if M is None else M.T

    def run():
        cache = {}
        out = mu_update(S, W, H, beta, mask=M, l1=0.05, with_loss=True, cache=cache)
        stats = mu_statistics(S.t(), H, W, beta, Mt, with_loss=True, cache={"nz": cache["nz"].transposed()})
        return cache["nz"], (*out, *stats)

    whole, ref = run()
    monkeypatch.setattr(updates, "_NNZ_BLOCK", 9)
    parted, got = run()
    assert len(whole.parts()) == 1 and len(parted.parts()) > 5
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), **tol)
