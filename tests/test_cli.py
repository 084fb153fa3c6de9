import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from torchnmf.cli import main, read_matrix


def counts(n=25, c=9, seed=0):
    rng = np.random.RandomState(seed)
    return rng.poisson(rng.rand(n, 2) @ rng.rand(2, c) * 4).astype(np.float64)


@pytest.fixture
def data():
    return counts()


def fit(tmp_path, *args):
    out = tmp_path / "res"
    rc = main(["fit", *map(str, args), "--max-iter", "15", "--quiet", "--device", "cpu", "-o", str(out)])
    return rc, out


def write(tmp_path, X, ext):
    path = tmp_path / f"X{ext}"
    if ext == ".npy":
        np.save(path, X)
    elif ext == ".npz":
        sp.save_npz(path, sp.csr_matrix(X))
    elif ext == ".mtx":
        scipy.io.mmwrite(str(path), sp.coo_matrix(X))
    elif ext == ".csv":
        header = ",".join(f"g{i}" for i in range(X.shape[1]))
        np.savetxt(path, X, delimiter=",", header=header, comments="")
    return path


@pytest.mark.parametrize("ext", [".npy", ".npz", ".mtx", ".csv"])
def test_formats_read_the_same_matrix(tmp_path, data, ext):
    path = write(tmp_path, data, ext)
    X = read_matrix(str(path))
    X = X.toarray() if sp.issparse(X) else X
    np.testing.assert_allclose(X, data)


def test_npz_with_named_dense_array(tmp_path, data):
    np.savez(tmp_path / "d.npz", X=data, other=np.ones(3))
    np.testing.assert_allclose(read_matrix(str(tmp_path / "d.npz")), data)


@pytest.mark.parametrize("model", ["nmf", "gamma-poisson", "pnmf"])
def test_fit_writes_factors_and_summary(tmp_path, data, model, capsys):
    path = write(tmp_path, data, ".npy")
    before = path.read_bytes()
    rc, out = fit(tmp_path, path, "--model", model, "--rank", 2)
    assert rc == 0, capsys.readouterr().err
    assert path.read_bytes() == before  # input untouched
    with np.load(f"{out}.npz") as z:
        W, H, history = z["W"], z["H"], z["history"]
    assert W.shape == (9, 2) and H.shape == (25, 2) and len(history) >= 2
    assert np.isfinite(W).all() and np.isfinite(H).all() and (W >= 0).all() and (H >= 0).all()
    summary = json.loads(open(f"{out}.json").read())
    assert summary["model"] == model and summary["shape"] == [25, 9] and summary["rank"] == 2
    assert summary["final_objective"] == pytest.approx(history[-1])
    assert model in capsys.readouterr().out


def test_nmf_objective_decreases_and_plot(tmp_path, data):
    rc, out = fit(tmp_path, write(tmp_path, data, ".mtx"), "--rank", 3, "--beta", 2)
    assert rc == 0
    with np.load(f"{out}.npz") as z:
        h = z["history"]
    assert np.all(np.diff(h) <= 1e-9 * h[:-1])
    pytest.importorskip("matplotlib")
    assert main(["plot", str(out)]) == 0
    png = f"{out}.png"
    assert os.path.getsize(png) > 1000
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_default_input_is_digits(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert main(["fit", "--rank", "4", "--max-iter", "3", "--quiet", "--device", "cpu", "-o", str(out)]) == 0
    summary = json.loads(open(f"{out}.json").read())
    assert summary["shape"] == [1797, 64] and "digits" in summary["input"]
    assert main(["plot", str(out), "--top", "4"]) == 0


@pytest.mark.parametrize(
    "args, match",
    [
        (["fit", "missing.npy", "--rank", "2"], "no such file"),
        (["fit", "X.txt", "--rank", "2"], "unknown input format"),
        (["fit", "--rank", "2", "--model", "svd"], "invalid choice"),
        (["fit", "--rank", "0"], "--rank"),
        (["fit", "--rank", "two"], "invalid int"),
        (["fit", "--rank", "2", "--device", "quantum"], "device"),
        (["fit", "--rank", "2", "--bogus"], "unrecognized"),
        (["plot", "nothing-here"], "no such file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X.txt").write_text("1 2\n3 4\n")
    if args[0] == "fit":
        args = args + ["-o", "out"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchnmf: error:") and match in err
    assert "Traceback" not in err


def test_bad_content(tmp_path, capsys):
    neg = tmp_path / "neg.npy"
    np.save(neg, -np.ones((3, 3)))
    assert main(["fit", str(neg), "--rank", "1", "-o", str(tmp_path / "o")]) == 2
    assert "negative" in capsys.readouterr().err
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not a numpy file")
    assert main(["fit", str(broken), "--rank", "1", "-o", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    vec = tmp_path / "vec.npy"
    np.save(vec, np.ones(4))
    assert main(["fit", str(vec), "--rank", "1", "-o", str(tmp_path / "o")]) == 2
    assert "2-D" in capsys.readouterr().err
    frac = tmp_path / "frac.npy"
    np.save(frac, np.full((3, 3), 0.5))
    assert main(["fit", str(frac), "--rank", "1", "--model", "gamma-poisson", "-o", str(tmp_path / "o")]) == 2
    assert "integer" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_output_never_overwrites_input(tmp_path, data, capsys):
    path = tmp_path / "X.npz"
    np.savez(path, X=data)
    before = path.read_bytes()
    assert main(["fit", str(path), "--rank", "2", "-o", str(tmp_path / "X")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["fit", str(tmp_path / "missing.npy"), "--rank", "2", "-o", "o", "--debug"])


def test_module_entry_point_exit_code():
    # a real process: `python -m torchnmf` with a bad flag exits 2 with one line on stderr
    bad = subprocess.run([sys.executable, "-m", "torchnmf", "fit", "--rank", "-3", "-o", "unused"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--rank" in bad.stderr


def test_plot_non_square_features_as_bars(tmp_path):
    pytest.importorskip("matplotlib")
    path = write(tmp_path, counts(c=10), ".npy")
    rc, out = fit(tmp_path, path, "--model", "gamma-poisson", "--rank", 2)
    assert rc == 0
    assert main(["plot", str(out), "--top", "2"]) == 0
    assert os.path.getsize(f"{out}.png") > 1000
    assert main(["plot", str(out), "--top", "0"]) == 2


def test_unwritable_output_is_one_line(tmp_path, data, capsys):
    path = write(tmp_path, data, ".npy")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["fit", str(path), "--rank", "2", "--max-iter", "2", "--quiet", "--device", "cpu",
               "-o", str(blocker / "sub" / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot write" in err
