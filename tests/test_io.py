import gzip
import os
import warnings

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


# issue 22 item 1: row labels come from the header and the whole first column, never one cell
@pytest.mark.parametrize("typo", ["1O", "-", "x1"])
@pytest.mark.parametrize("header", [True, False])
def test_table_first_cell_typo_is_an_error(tmp_path, typo, header):
    path = tmp_path / "t.csv"
    path.write_text(("a,b,c\n" if header else "") + f"{typo},2,3\n4,5,6\n7,8,9\n")
    line = 2 if header else 1
    name = " \\(a\\)" if header else ""
    with pytest.raises(ReadError, match=rf"t.csv line {line}: '{typo}' at row 0, column 0{name} is not a number; "
                                        "the first column mixes text and numbers"):
        read_matrix(path)


def test_table_missing_first_cell_is_nan_not_a_label(tmp_path):
    # NA and empty cells are missing values (NaN, which torchnmf fit refuses), in any column
    for cell in ("NA", ""):
        (tmp_path / "na.csv").write_text(f"a,b,c\n{cell},2,3\n4,5,6\n")
        M = read_matrix(tmp_path / "na.csv")
        assert M.shape == (2, 3) and M.row_names is None and list(M.col_names) == ["a", "b", "c"]
        assert np.isnan(M.X[0, 0]) and np.array_equal(M.X[1], [4, 5, 6])
    (tmp_path / "first.csv").write_text(",2,3\n4,5,6\n")  # no header: an empty corner before numbers
    M = read_matrix(tmp_path / "first.csv")
    assert M.shape == (2, 3) and M.col_names is None and M.row_names is None and np.isnan(M.X[0, 0])


def test_table_labels_from_the_whole_first_column(tmp_path):
    (tmp_path / "named.csv").write_text("cell,a,b\nc1,1,2\nc2,3,4\n")  # an index name in the corner
    M = read_matrix(tmp_path / "named.csv")
    assert list(M.row_names) == ["c1", "c2"] and list(M.col_names) == ["a", "b"]
    np.testing.assert_array_equal(M.X, [[1, 2], [3, 4]])
    (tmp_path / "plain.csv").write_text("c1,1,2\nc2,3,4\n")  # no header, all text: labels
    M = read_matrix(tmp_path / "plain.csv")
    assert list(M.row_names) == ["c1", "c2"] and M.col_names is None
    (tmp_path / "range.csv").write_text(",a,b\n0,1,2\n1,3,4\n")  # pandas' numbered index: empty corner
    M = read_matrix(tmp_path / "range.csv")
    assert list(M.row_names) == ["0", "1"] and M.shape == (2, 2)
    (tmp_path / "mixed.csv").write_text("cell,a,b\nc1,1,2\n7,3,4\n")
    with pytest.raises(ReadError, match="line 2: 'c1' at row 0, column 0 \\(cell\\) is not a number.*"
                                        "leave the header's first cell empty"):
        read_matrix(tmp_path / "mixed.csv")


def test_table_error_line_as_in_the_file(tmp_path):
    (tmp_path / "gaps.csv").write_text("\na,b\n\n1,2\n\n3,4\n5,x\n")
    with pytest.raises(ReadError, match=r"gaps.csv line 7: 'x' at row 2, column 1 \(b\) is not a number"):
        read_matrix(tmp_path / "gaps.csv")
    (tmp_path / "gaps.csv").write_text("\na,b\n\n1,2\n\n3,4\n")
    np.testing.assert_array_equal(read_matrix(tmp_path / "gaps.csv").X, [[1, 2], [3, 4]])


def test_table_duplicate_column_names_kept_with_one_warning(tmp_path):
    (tmp_path / "dup.csv").write_text("a,a,c,c\n1,2,3,4\n5,6,7,8\n")
    with pytest.warns(UserWarning, match=r"duplicate column names \('a', 'c'\); they are kept") as rec:
        M = read_matrix(tmp_path / "dup.csv")
    assert len(rec) == 1 and list(M.col_names) == ["a", "a", "c", "c"]


def test_table_word_in_a_first_line_of_numbers_is_not_a_header(tmp_path):
    (tmp_path / "t.csv").write_text("0,1O,3\n4,2,1\n")  # was read as a header: one row lost
    with pytest.raises(ReadError, match=r"t.csv line 1: '1O' at row 0, column 1 is not a number"):
        read_matrix(tmp_path / "t.csv")
    (tmp_path / "h.csv").write_text("id,a,NA\nr1,4,2\n")  # words and a missing name: a header
    M = read_matrix(tmp_path / "h.csv")
    assert list(M.col_names) == ["a", "NA"] and list(M.row_names) == ["r1"]


def test_atomic_write_all_replaces_none_unless_all_written(tmp_path):
    from torchnmf.io import atomic_write_all

    a, b = tmp_path / "a.bin", tmp_path / "b.txt"
    a.write_bytes(b"old a")
    b.write_text("old b")

    def fail(fh):
        fh.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_all([(a, "wb", lambda fh: fh.write(b"new a")), (b, "w", fail)])
    assert a.read_bytes() == b"old a" and b.read_text() == "old b"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]
    atomic_write_all([(a, "wb", lambda fh: fh.write(b"new a")), (b, "w", lambda fh: fh.write("new b"))])
    assert a.read_bytes() == b"new a" and b.read_text() == "new b"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]


# issue 22 item 3: sizes a header claims are checked before anything is allocated
def _light(fn):
    """Run ``fn`` and return (its ReadError, the peak bytes numpy/python allocated meanwhile)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ReadError) as info:
            fn()
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("gz", [False, True])
def test_mtx_claiming_huge_sizes_fails_fast(tmp_path, gz):
    text = b"%%MatrixMarket matrix coordinate real general\n% a comment\n300000000 5 1\n1 1 3\n"
    path = tmp_path / ("huge.mtx.gz" if gz else "huge.mtx")
    path.write_bytes(gzip.compress(text) if gz else text)
    err, peak = _light(lambda: read_matrix(path))
    assert "huge.mtx" in str(err) and "the header claims 300000000 x 5 with 1 entries" in str(err)
    assert "header is probably damaged" in str(err) and peak < 20 * 2**20


@pytest.mark.parametrize("header, match", [
    (b"coordinate real general\n3 3 1000000000\n", "claims 1000000000 entries in a 3 x 3 matrix"),
    (b"coordinate real general\n100000 100000 2000000000\n1 1 1\n", "the file holds at most"),
    (b"coordinate pattern general\n100000 100000 2000000000\n1 1\n", "the file holds at most"),
    (b"array real general\n100000 100000\n1\n", "a dense 100000 x 100000 matrix, but the file holds at most"),
])
def test_mtx_claiming_more_entries_than_the_file_holds(tmp_path, header, match):
    path = tmp_path / "claims.mtx"
    path.write_bytes(b"%%MatrixMarket matrix " + header)
    err, peak = _light(lambda: read_matrix(path))
    assert match in str(err) and "claims.mtx" in str(err) and peak < 20 * 2**20


def test_npy_claiming_huge_shape_fails_fast(tmp_path):
    from numpy.lib import format as npf

    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:
        npf.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (300000000, 5)})
        fh.write(b"\0" * 16)
    err, peak = _light(lambda: read_matrix(path))
    assert "huge.npy: the header claims shape (300000000, 5) of float64 (12000000000 bytes)" in str(err)
    assert peak < 20 * 2**20


def test_sizes_beyond_available_memory_and_memory_errors(tmp_path, monkeypatch):
    import torchnmf.io as tio

    X = counts(30, 20)
    scipy.io.mmwrite(str(tmp_path / "ok.mtx"), sp.coo_matrix(X))
    np.save(tmp_path / "ok.npy", X)
    monkeypatch.setattr(tio, "available_memory", lambda: 1000)
    with pytest.raises(ReadError, match=r"ok.mtx: the header claims 30 x 20 with \d+ entries, about 0.0 GiB to read; "
                                        "this machine has 0.0 GiB available"):
        read_matrix(tmp_path / "ok.mtx")
    with pytest.raises(ReadError, match="ok.npy: the header claims shape"):
        read_matrix(tmp_path / "ok.npy")
    monkeypatch.setattr(tio, "available_memory", lambda: None)  # unknown: no memory check

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 9.00 GiB")

    monkeypatch.setattr(scipy.io, "mmread", no_memory)
    with pytest.raises(ReadError, match="ok.mtx: it does not fit in this machine's memory"):
        read_matrix(tmp_path / "ok.mtx")
    np.testing.assert_array_equal(read_matrix(tmp_path / "ok.npy").X, X)


def test_npz_claiming_huge_sizes_fails_fast(tmp_path):
    import zipfile
    from numpy.lib import format as npf

    def member(shape, payload=b"\0" * 16):
        buf = __import__("io").BytesIO()
        npf.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
        return buf.getvalue() + payload

    with zipfile.ZipFile(tmp_path / "dense.npz", "w") as zf:
        zf.writestr("X.npy", member((300000000, 5)))
    err, peak = _light(lambda: read_matrix(tmp_path / "dense.npz"))
    assert "dense.npz: array 'X' claims shape (300000000, 5) of float64" in str(err) and peak < 20 * 2**20
    # scipy.sparse.save_npz layout (COO): a shape claiming 300,000,000 rows for one entry
    sp.save_npz(tmp_path / "coo.npz", sp.coo_matrix(np.eye(2)), compressed=False)
    with np.load(tmp_path / "coo.npz") as z:
        arrays = dict(z)
    arrays["shape"] = np.array([300000000, 2])
    np.savez(tmp_path / "coo.npz", **arrays)
    err, peak = _light(lambda: read_matrix(tmp_path / "coo.npz"))
    assert "coo.npz: the header claims 300000000 x 2 with 2 entries" in str(err) and peak < 20 * 2**20


def test_10x_duplicate_symbols_are_made_unique_with_a_warning(tmp_path):
    X = counts(5, 6)
    write_10x(tmp_path / "tenx", X)
    symbols = ["TBCE", "Gene1", "TBCE", "MATR3", "MATR3", "TBCE"]
    with open(tmp_path / "tenx" / "features.tsv", "w") as fh:
        fh.writelines(f"ENSG{j:05d}\t{s}\tGene Expression\n" for j, s in enumerate(symbols))
    with pytest.warns(UserWarning, match=r"2 feature names appear more than once \('MATR3', 'TBCE'\); the repeats "
                                         r"were renamed NAME-1, NAME-2") as rec:
        M = read_matrix(tmp_path / "tenx")
    assert rec[0].filename == __file__  # points at the caller's line
    assert list(M.col_names) == ["TBCE", "Gene1", "TBCE-1", "MATR3", "MATR3-1", "TBCE-2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_10x(tmp_path / "clean", X)
        assert len(set(read_matrix(tmp_path / "clean").col_names)) == 6  # unique names: no warning


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


# -- issue 23 item 9: numeric .txt files, ragged tables named by line ----------------------------
def test_numeric_txt_files_are_read(tmp_path):
    import gzip

    X = np.arange(12, dtype=np.float64).reshape(4, 3) / 2
    np.savetxt(tmp_path / "x.txt", X)
    M = read_matrix(tmp_path / "x.txt")
    np.testing.assert_array_equal(M.X, X)
    assert M.row_names is None and M.col_names is None
    with gzip.open(tmp_path / "x.txt.gz", "wt") as fh:
        np.savetxt(fh, X, fmt="%d")
    np.testing.assert_array_equal(read_matrix(tmp_path / "x.txt.gz").X, np.floor(X))
    (tmp_path / "w.txt").write_text("1 2 3\n4 x 6\n")
    with pytest.raises(ReadError, match=r"w.txt: .*white space"):
        read_matrix(tmp_path / "w.txt")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ReadError, match="e.txt is empty"):
        read_matrix(tmp_path / "e.txt")


@pytest.mark.parametrize("ext, sep", [(".tsv", "\t"), (".csv", ",")])
def test_ragged_line_is_named(tmp_path, ext, sep):
    path = tmp_path / f"r{ext}"
    path.write_text(sep.join("abc") + "\n" + sep.join("123") + "\n\n" + sep.join("45") + "\n" + sep.join("789") + "\n")
    with pytest.raises(ReadError, match=rf"r{ext} line 4 has 2 fields where the lines before have 3: a ragged line"):
        read_matrix(path)
    path.write_text(sep.join("abc") + "\n" + sep.join("123") + "\n" + sep.join(["4", "", "6"]) + "\n")
    M = read_matrix(path)  # an empty field is a missing value, not a ragged line
    assert M.shape == (2, 3) and np.isnan(M.X[1, 1])
