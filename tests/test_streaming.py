"""Row streaming: every source gives the same batches, memory maps stay maps, bad input is refused."""
import gzip
import os
import pickle

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from torchnmf.streaming import EpochSampler, RowBatch, SparseRows, collate_rows, mtx_to_csr, row_loader, save_csr


@pytest.fixture
def X():
    M = sp.random(37, 9, density=0.3, format="csr", random_state=np.random.RandomState(1))
    M.data = np.ceil(M.data * 10)
    keep = np.ones(37)
    keep[5] = 0  # an empty row
    M = (sp.diags(keep) @ M).tocsr()
    M.eliminate_zeros()
    return M


def _dense(batch: RowBatch) -> np.ndarray:
    return (batch.X.to_dense() if batch.X.layout != torch.strided else batch.X).numpy()


def _sources(X, tmp_path):
    sp.save_npz(tmp_path / "u.npz", X, compressed=False)
    scipy.io.mmwrite(str(tmp_path / "m.mtx"), X)
    np.save(tmp_path / "d.npy", X.toarray())
    return {
        "scipy": X,
        "coo": X.tocoo(),
        "torch-dense": torch.tensor(X.toarray()),
        "torch-coo": torch.tensor(X.toarray()).to_sparse(),
        "torch-csr": torch.tensor(X.toarray()).to_sparse_csr(),
        "numpy": X.toarray(),
        "dir": save_csr(X, tmp_path / "csr"),
        "npz": str(tmp_path / "u.npz"),
        "mtx": str(tmp_path / "m.mtx"),
        "npy": str(tmp_path / "d.npy"),
    }


@pytest.mark.parametrize("layout", ["csr", "coo", "dense"])
def test_every_source_gives_the_rows(X, tmp_path, layout):
    expected = X.toarray()
    for name, src in _sources(X, tmp_path).items():
        ds = SparseRows(src, layout=layout)
        assert ds.shape == X.shape and len(ds) == X.shape[0], name
        assert ds.nnz == X.nnz, name
        seen = []
        for batch in row_loader(ds, 8, shuffle=True, seed=3):
            assert batch.X.layout == {"csr": torch.sparse_csr, "coo": torch.sparse_coo, "dense": torch.strided}[layout]
            assert batch.X.dtype == torch.float64
            np.testing.assert_array_equal(_dense(batch), expected[batch.rows.numpy()], err_msg=name)
            seen += batch.rows.tolist()
        assert sorted(seen) == list(range(X.shape[0])), name


def test_memory_mapped_sources_stay_on_disk(X, tmp_path):
    src = _sources(X, tmp_path)
    for name in ("dir", "npz", "mtx"):
        ds = SparseRows(src[name])
        assert isinstance(ds._arrays["data"], np.memmap), name
        assert isinstance(ds._arrays["indices"], np.memmap), name
    assert isinstance(SparseRows(src["npy"])._arrays["dense"], np.memmap)
    # a DataLoader worker reopens the map instead of receiving a copy of it
    ds = SparseRows(src["dir"])
    state = pickle.dumps(ds)
    assert len(state) < 2000
    again = pickle.loads(state)
    np.testing.assert_array_equal(_dense(again[3]), X[3].toarray())


def test_compressed_npz_is_read_into_memory_with_a_warning(X, tmp_path):
    sp.save_npz(tmp_path / "c.npz", X, compressed=True)
    with pytest.warns(UserWarning, match="compressed"):
        ds = SparseRows(str(tmp_path / "c.npz"))
    np.testing.assert_array_equal(_dense(ds.__getitems__(list(range(37)))), X.toarray())


def test_workers_give_the_same_batches(X, tmp_path):
    ds = SparseRows(save_csr(X, tmp_path / "csr"))
    one = [(b.rows, _dense(b)) for b in row_loader(ds, 10, shuffle=True, seed=7)]
    two = [(b.rows, _dense(b)) for b in row_loader(ds, 10, shuffle=True, seed=7, num_workers=2)]
    assert len(one) == len(two) == 4
    for (r1, x1), (r2, x2) in zip(one, two):
        assert torch.equal(r1, r2)
        np.testing.assert_array_equal(x1, x2)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, 3, shuffle=True, seed=5)
    first = list(s)
    assert len(s) == 4 and sorted(sum(first, [])) == list(range(10))
    assert list(s) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first
    t = EpochSampler(10, 3, shuffle=True, seed=5)
    t.set_epoch(1)
    assert list(t) == second  # a resumed job sees the same order
    assert list(EpochSampler(10, 3, shuffle=False, drop_last=True)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert len(EpochSampler(10, 3, drop_last=True)) == 3
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 0)


def test_shards_partition_the_rows(X):
    ds = SparseRows(X)
    parts = [ds.shard(r, 3) for r in range(3)]
    assert [p.rows for p in parts] == [range(0, 12), range(12, 24), range(24, 37)]
    rows = []
    for p in parts:
        for b in row_loader(p, 5):
            np.testing.assert_array_equal(_dense(b), X[b.rows.numpy()].toarray())
            rows += b.rows.tolist()
    assert rows == list(range(37))
    sub = parts[1].shard(1, 2)
    assert sub.rows == range(18, 24)
    assert len(row_loader(X, 5, shard=True).dataset) == 37  # one process: everything


def test_getitems_handles_order_repeats_and_negative_positions(X):
    ds = SparseRows(X)
    assert ds[5].X._nnz() == 0  # the empty row
    contiguous = ds.__getitems__([0, 1, 2])
    contiguous.X.values().mul_(0)  # a batch is a copy: the source is untouched
    assert X[0].sum() > 0
    b = ds.__getitems__([4, 2, 2, -1])
    assert b.rows.tolist() == [4, 2, 2, 36]
    np.testing.assert_array_equal(_dense(b), X[[4, 2, 2, 36]].toarray())
    assert ds.__getitems__([]).X.shape == (0, 9)
    with pytest.raises(IndexError):
        ds.__getitems__([37])
    with pytest.raises(IndexError):
        ds.batch([-1])


def test_collate_and_to(X):
    ds = SparseRows(X)
    b = collate_rows([ds[1], ds[2]])
    assert b.rows.tolist() == [1, 2] and b.X.layout == torch.sparse_csr
    np.testing.assert_array_equal(_dense(b), X[[1, 2]].toarray())
    assert collate_rows(b) is b
    c = collate_rows([SparseRows(X, layout="coo")[0], SparseRows(X, layout="coo")[3]])
    assert c.X.layout == torch.sparse_coo
    with pytest.raises(TypeError, match="RowBatch"):
        collate_rows([1, 2])
    f = b.to("cpu", dtype=torch.float32)
    assert f.X.dtype == torch.float32 and f.rows.dtype == torch.int64
    assert SparseRows(X, dtype=torch.float32)[0].X.dtype == torch.float32
    assert SparseRows(X.astype(np.float32))[0].X.dtype == torch.get_default_dtype()


def test_unsorted_and_duplicate_entries_are_summed_without_touching_the_input(tmp_path):
    data = np.array([1.0, 2.0, 3.0, 4.0])
    indices = np.array([2, 0, 2, 1])
    indptr = np.array([0, 3, 4])
    M = sp.csr_matrix((data.copy(), indices.copy(), indptr.copy()), shape=(2, 3))
    ds = SparseRows(M)
    np.testing.assert_array_equal(_dense(ds.__getitems__([0, 1])), [[2.0, 0.0, 4.0], [0.0, 4.0, 0.0]])
    np.testing.assert_array_equal(M.data, data)
    np.testing.assert_array_equal(M.indices, indices)
    # a memory-mapped file in non-canonical order is sorted per batch instead
    sp.save_npz(tmp_path / "raw.npz", M, compressed=False)
    mapped = SparseRows(str(tmp_path / "raw.npz"))
    assert isinstance(mapped._arrays["data"], np.memmap)
    for layout in ("csr", "coo", "dense"):
        np.testing.assert_array_equal(_dense(SparseRows(str(tmp_path / "raw.npz"), layout=layout)[0]),
                                      [[2.0, 0.0, 4.0]])
    t = torch.sparse_coo_tensor(torch.tensor([[0, 0, 0, 1], indices.tolist()]), torch.tensor(data), (2, 3))
    np.testing.assert_array_equal(_dense(SparseRows(t, layout="coo")[0]), [[2.0, 0.0, 4.0]])


def test_matrix_market_conversion(tmp_path):
    path = tmp_path / "sym.mtx.gz"
    with gzip.open(path, "wt") as f:
        f.write("%%MatrixMarket matrix coordinate integer symmetric\n% a comment\n3 3 4\n"
                "1 1 5\n2 1 2\n3 2 7\n3 3 1\n")
    out = mtx_to_csr(path, tmp_path / "sym", chunk_lines=2)
    ds = SparseRows(out)
    np.testing.assert_array_equal(_dense(ds.__getitems__([0, 1, 2])), [[5, 2, 0], [2, 0, 7], [0, 7, 1]])
    pat = tmp_path / "p.mtx"
    pat.write_text("%%MatrixMarket matrix coordinate pattern general\n2 4 3\n2 4\n1 2\n2 1\n")
    np.testing.assert_array_equal(_dense(SparseRows(str(pat)).__getitems__([0, 1])), [[0, 1, 0, 0], [1, 0, 0, 1]])
    assert os.path.isdir(str(pat) + ".csr")  # the conversion is cached next to the file
    dup = tmp_path / "dup.mtx"
    dup.write_text("%%MatrixMarket matrix coordinate real general\n1 2 3\n1 2 1.5\n1 1 1\n1 2 2\n")
    np.testing.assert_array_equal(_dense(SparseRows(str(dup))[0]), [[1.0, 3.5]])
    arr = tmp_path / "a.mtx"
    scipy.io.mmwrite(str(arr), np.array([[1.0, 0.0], [2.0, 3.0]]))
    np.testing.assert_array_equal(_dense(SparseRows(str(arr)).__getitems__([0, 1])), [[1, 0], [2, 3]])
    bad = tmp_path / "bad.mtx"
    bad.write_text("%%MatrixMarket matrix coordinate complex general\n1 1 1\n1 1 1 0\n")
    with pytest.raises(TypeError, match="complex"):
        mtx_to_csr(bad)
    out_of_shape = tmp_path / "oos.mtx"
    out_of_shape.write_text("%%MatrixMarket matrix coordinate real general\n2 2 1\n3 1 1\n")
    with pytest.raises(ValueError, match="outside the declared shape"):
        mtx_to_csr(out_of_shape)
    with pytest.raises(ValueError, match="Matrix Market"):
        (tmp_path / "x.mtx").write_text("hello\n")
        mtx_to_csr(tmp_path / "x.mtx")


def test_bad_sources_raise_clear_errors(X, tmp_path):
    neg = X.copy()
    neg.data[0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        SparseRows(neg)
    nan = X.copy()
    nan.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SparseRows(save_csr(nan, tmp_path / "nan"))
    with pytest.raises(ValueError, match="non-negative"):
        SparseRows(-np.ones((3, 2)))
    with pytest.raises(TypeError, match="real numbers"):
        SparseRows(np.array([["a"]]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseRows(str(tmp_path / "missing.npz"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a directory"):
        SparseRows(str(tmp_path / "f.txt"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="meta.json"):
        SparseRows(str(tmp_path / "empty"))
    np.savez(tmp_path / "plain.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="scipy.sparse"):
        SparseRows(str(tmp_path / "plain.npz"))
    d = save_csr(X, tmp_path / "broken")
    np.save(os.path.join(d, "indptr.npy"), np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="valid CSR"):
        SparseRows(d)
    with pytest.raises(ValueError, match="layout"):
        SparseRows(X, layout="bsr")
    with pytest.raises(TypeError, match="dtype"):
        SparseRows(X, dtype=torch.int64)
    with pytest.raises(TypeError, match="source"):
        SparseRows(object())
    with pytest.raises(ValueError, match="rows"):
        SparseRows(X, rows=range(0, 40))
    with pytest.raises(ValueError, match="2-D"):
        SparseRows(torch.ones(3))


# -- issue 22.8: half precision and non-native arrays -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_saved_and_served_as_float32(tmp_path, dtype):
    X = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]], dtype=dtype)
    directory = save_csr(X, tmp_path / "half")
    for source in (directory, X, X.to_sparse()):
        ds = SparseRows(source)
        assert ds.dtype == torch.float32
        torch.testing.assert_close(ds.batch([0, 1]).X.to_dense(), X.float())
        batch = next(iter(row_loader(source, batch_size=2)))
        torch.testing.assert_close(batch.X.to_dense(), X.float())


@pytest.mark.parametrize("kind", [">f8", np.longdouble])
def test_non_native_arrays_are_saved_and_served(tmp_path, kind):
    A = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]]).astype(kind)
    directory = save_csr(A, tmp_path / "arr")
    for source in (directory, A):
        ds = SparseRows(source)
        assert ds.dtype == torch.float64  # a float64 array's values, whatever its byte order or width
        np.testing.assert_array_equal(ds.batch([0, 1]).X.to_dense().numpy(), A.astype(np.float64))
    # a memory-mapped big-endian file (np.save keeps the byte order)
    d = tmp_path / "big"
    d.mkdir()
    C = sp.csr_matrix(A.astype(np.float64))
    for name in ("data", "indices", "indptr"):
        np.save(d / f"{name}.npy", getattr(C, name).astype(getattr(C, name).dtype.newbyteorder(">")))
    (d / "meta.json").write_text('{"shape": [2, 3], "canonical": true}')
    ds = SparseRows(str(d))
    assert ds.dtype == torch.float64
    np.testing.assert_array_equal(ds.batch([0, 1]).X.to_dense().numpy(), C.toarray())


@pytest.mark.parametrize("fit", ["nmf_online", "gamma_svi"])
def test_streaming_fits_hold_one_block_at_a_time(monkeypatch, fit):
    """When a block is read, no earlier block (nor anything made from it) is alive; big blocks are trimmed after."""
    import gc
    import weakref

    import torchnmf.parallel as parallel
    from torchnmf.nmf import NMF
    from torchnmf.poisson import GammaPoisson

    X = sp.random(60, 12, density=0.4, format="csr", random_state=0)
    X.data = np.ceil(X.data * 5)
    source = SparseRows(X)
    alive, reads, trims = [], [], []
    batch = SparseRows.batch

    def read(self, rows):
        gc.disable()  # only reference counting may free the last block (a cycle would hold it until a collection)
        reads.append(sum(r() is not None for r in alive))
        out = batch(self, rows)
        alive.append(weakref.ref(out.X))
        return out

    monkeypatch.setattr(SparseRows, "batch", read)
    monkeypatch.setattr(parallel, "_TRIM_BYTES", 1)  # every block counts as big here
    monkeypatch.setattr(parallel, "release_freed", lambda: trims.append(len(reads)))
    try:
        if fit == "nmf_online":
            parallel.fit_nmf_online(NMF(W=torch.rand(12, 3, dtype=torch.float64), rank=3), source, batch_size=16,
                                    epochs=2, shuffle=False)
        else:
            parallel.fit_gamma_svi(GammaPoisson(60, 12, 3, dtype=torch.float64), source, batch_size=16, epochs=2,
                                   shuffle=False)
    finally:
        gc.enable()
    assert len(reads) == 8 and reads == [0] * 8
    assert trims == [1, 2, 3, 5, 6, 7]  # before every read but an epoch's first (4 blocks an epoch)


def test_release_freed_trims_glibc_and_is_a_no_op_elsewhere():
    import platform
    import sys

    from torchnmf._memory import release_freed

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_freed() is glibc
    assert release_freed() is glibc  # looked up once, callable again
