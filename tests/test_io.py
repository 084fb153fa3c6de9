import gzip
import os

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from torchnmf.io import Matrix, ReadError, atomic_write, first_entry, read_matrix, round_counts


def counts(n=7, c=5, seed=0):
    rng = np.random.RandomState(seed)
    return rng.poisson(2.0, size=(n, c)).astype(np.float64)


def labelled(X):
    return pd.DataFrame(X, index=[f"Cell_{i}" for i in range(X.shape[0])],
                        columns=[f"Gene{j}" for j in range(X.shape[1])])


@pytest.mark.parametrize("name, sep", [("x.csv", ","), ("x.tsv", "\t"), ("x.csv.gz", ","), ("x.tsv.gz", "\t")])
def test_labelled_table_keeps_names(tmp_path, name, sep):
    X = counts()
    labelled(X).to_csv(tmp_path / name, sep=sep)
    M = read_matrix(tmp_path / name)
    np.testing.assert_array_equal(M.X, X)
    assert list(M.row_names) == [f"Cell_{i}" for i in range(7)]
    assert list(M.col_names) == [f"Gene{j}" for j in range(5)]


def test_table_header_only_and_plain_numbers(tmp_path):
    X = counts()
    pd.DataFrame(X, columns=list("abcde")).to_csv(tmp_path / "h.csv", index=False)
    M = read_matrix(tmp_path / "h.csv")
    np.testing.assert_array_equal(M.X, X)
    assert M.row_names is None and list(M.col_names) == list("abcde")
    np.savetxt(tmp_path / "p.csv", X, delimiter=",")
    M = read_matrix(tmp_path / "p.csv")
    np.testing.assert_array_equal(M.X, X)
    assert M.row_names is None and M.col_names is None


def test_table_r_style_header_one_short(tmp_path):
    # R's write.table: the header has no corner cell
    (tmp_path / "r.tsv").write_text("g1\tg2\nc1\t1\t2\nc2\t3\t4\n")
    M = read_matrix(tmp_path / "r.tsv")
    np.testing.assert_array_equal(M.X, [[1, 2], [3, 4]])
    assert list(M.row_names) == ["c1", "c2"] and list(M.col_names) == ["g1", "g2"]


def test_table_names_the_first_non_number(tmp_path):
    df = labelled(counts()).astype(object)
    df.iloc[4, 1] = "n/a?"
    df.iloc[2, 3] = "oops"
    df.to_csv(tmp_path / "bad.csv")
    with pytest.raises(ReadError, match=r"line 4: 'oops' at row 2 \(Cell_2\), column 3 \(Gene3\)"):
        read_matrix(tmp_path / "bad.csv")


def test_transpose_swaps_names(tmp_path):
    X = counts()
    labelled(X).T.to_csv(tmp_path / "genes_by_cells.csv")
    M = read_matrix(tmp_path / "genes_by_cells.csv", transpose=True)
    np.testing.assert_array_equal(M.X, X)
    assert M.row_names[0] == "Cell_0" and M.col_names[-1] == "Gene4"


def write_10x(directory, X, gz=False, v2=False):
    """As Cell Ranger writes it: features x barcodes, features.tsv with id, name, type."""
    os.makedirs(directory, exist_ok=True)
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    suffix = ".gz" if gz else ""
    with (gzip.open(os.path.join(directory, "matrix.mtx.gz"), "wb") if gz
          else open(os.path.join(directory, "matrix.mtx"), "wb")) as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
    feats = "genes.tsv" if v2 else "features.tsv"
    with opener(os.path.join(directory, feats + suffix)) as fh:
        for j in range(X.shape[1]):
            fh.write(f"ENSG{j:05d}\tGene{j}" + ("" if v2 else "\tGene Expression") + "\n")
    with opener(os.path.join(directory, "barcodes.tsv" + suffix)) as fh:
        for i in range(X.shape[0]):
            fh.write(f"AAAC{i:04d}-1\n")


@pytest.mark.parametrize("gz, v2", [(False, False), (True, False), (False, True)])
def test_10x_directory(tmp_path, gz, v2):
    X = counts(9, 6)
    write_10x(tmp_path / "filtered", X, gz=gz, v2=v2)
    M = read_matrix(tmp_path / "filtered")
    assert sp.issparse(M.X) and M.shape == (9, 6)
    np.testing.assert_array_equal(M.X.toarray(), X)
    assert M.row_names[3] == "AAAC0003-1" and M.col_names[2] == "Gene2"
    # the matrix file itself reads the same way
    M2 = read_matrix(tmp_path / "filtered" / ("matrix.mtx.gz" if gz else "matrix.mtx"))
    np.testing.assert_array_equal(M2.X.toarray(), X)
    assert list(M2.col_names) == list(M.col_names)


def test_10x_mismatched_names_and_bad_directories(tmp_path):
    X = counts(4, 3)
    write_10x(tmp_path / "d", X)
    (tmp_path / "d" / "barcodes.tsv").write_text("only-one\n")
    with pytest.raises(ReadError, match="1 barcodes but .* has 4"):
        read_matrix(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReadError, match="without matrix.mtx"):
        read_matrix(tmp_path / "empty")
    (tmp_path / "x.npy").mkdir()
    with pytest.raises(ReadError, match="x.npy: it is a directory, not a .npy file"):
        read_matrix(tmp_path / "x.npy")
    with pytest.raises(ReadError, match="no such file"):
        read_matrix(tmp_path / "missing.npy")


def test_h5ad_x_layers_and_raw(tmp_path):
    import anndata  # in the test extra
    X = counts(8, 5)
    ad = anndata.AnnData(X=np.log1p(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(8)]),
                         var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))
    ad.layers["counts"] = sp.csr_matrix(X)
    raw = anndata.AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=[f"rg{j}" for j in range(5)]),
                          obs=pd.DataFrame(index=ad.obs_names))
    ad.raw = raw
    path = tmp_path / "a.h5ad"
    ad.write_h5ad(path)
    M = read_matrix(path)
    np.testing.assert_allclose(M.X, np.log1p(X))
    assert M.row_names[1] == "c1" and M.col_names[2] == "g2"
    assert set(M.alternatives) == {"counts", "raw"}
    M = read_matrix(path, layer="counts")
    np.testing.assert_array_equal(M.X.toarray(), X)
    M = read_matrix(path, layer="raw")
    np.testing.assert_array_equal(M.X.toarray(), X)
    assert M.col_names[0] == "rg0"
    with pytest.raises(ReadError, match="no layer 'spliced'; layers: counts, raw"):
        read_matrix(path, layer="spliced")
    with pytest.raises(ReadError, match="layer='counts' applies to .h5ad files only"):
        read_matrix(tmp_path / "x.npy", layer="counts")


def test_npz_names_round_trip(tmp_path):
    X = counts()
    np.savez(tmp_path / "n.npz", X=X, row_names=np.array(["a", "b", "c", "d", "e", "f", "g"]),
             col_names=np.array(list("vwxyz")))
    M = read_matrix(tmp_path / "n.npz")
    np.testing.assert_array_equal(M.X, X)
    assert M.row_names[0] == "a" and M.col_names[-1] == "z"
    np.savez(tmp_path / "short.npz", X=X, col_names=np.array(["v"]))
    with pytest.raises(ReadError, match="1 column names for 5 columns"):
        read_matrix(tmp_path / "short.npz")


def test_round_counts_accepts_float_noise():
    X = counts() + 1e-11
    X[0, 0] = 2.9999999999
    before = X.copy()
    R, n = round_counts(X)
    assert n == X.size
    np.testing.assert_array_equal(R, np.rint(before))
    np.testing.assert_array_equal(X, before)  # input untouched
    R, n = round_counts(np.rint(X))
    assert n == 0
    big = np.array([[1e15 + 2.0]])  # float64 spacing there is 0.125: still exact
    assert round_counts(big)[1] == 0


@pytest.mark.parametrize("sparse", [False, True])
def test_round_counts_names_first_offender(sparse):
    X = counts()
    X[5, 1] = 3.25
    X[2, 4] = 0.5  # first in row-major order
    A = sp.csr_matrix(X) if sparse else X
    with pytest.raises(ValueError, match=r"X must hold counts .*, but row 2 \(r2\), column 4 \(c4\) holds 0.5"):
        round_counts(A, row_names=[f"r{i}" for i in range(7)], col_names=[f"c{j}" for j in range(5)])
    R, n = round_counts(A, force=True)
    R = R.toarray() if sparse else R
    assert n == 2 and R[5, 1] == 3 and R[2, 4] == 0


def test_first_entry_unsorted_csr():
    A = sp.csr_matrix((np.array([5.0, 7.0, 1.0]), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    assert not A.has_sorted_indices
    assert first_entry(A, A.data > 4) == (0, 0, 7.0)
    D = np.array([[0.0, 1.0], [2.0, 0.0]])
    assert first_entry(D, D > 1.5) == (1, 0, 2.0)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
    with atomic_write(path, "w") as fh:
        fh.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not mkstemp's 0600


def test_matrix_transposed_sparse():
    M = Matrix(sp.csr_matrix(np.eye(3)[:2]), np.array(["a", "b"]), None, "s")
    T = M.transposed()
    assert T.shape == (3, 2) and sp.isspmatrix_csr(T.X) and T.col_names[1] == "b" and T.row_names is None


# -- issue 22.8/22.10/22.11: round_counts on every dtype, non-finite values, the shared rule ---
@pytest.mark.parametrize("kind", [np.float16, ">f8", np.longdouble, np.float32])
def test_round_counts_any_float_dtype(kind):
    X = np.array([[1.0, 2.0], [3.0, 0.0]]).astype(kind)
    X[0, 1] += np.asarray(1e-7 if np.dtype(kind).itemsize > 2 else 0, dtype=kind)
    R, n = round_counts(X)
    np.testing.assert_array_equal(np.asarray(R, dtype=np.float64), [[1, 2], [3, 0]])
    bad = X.copy()
    bad[1, 0] = 2.5
    with pytest.raises(ValueError, match=r"row 1, column 0 holds 2.5"):
        round_counts(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, -1.0])
@pytest.mark.parametrize("sparse", [False, True])
def test_round_counts_refuses_nan_inf_and_negative(value, sparse):
    X = counts()
    X[3, 2] = value
    A = sp.csr_matrix(X) if sparse else X
    with pytest.raises(ValueError, match=r"row 3, column 2"):
        round_counts(A, force=True)
