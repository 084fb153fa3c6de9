import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from torchnmf.cli import main, read_fit, read_matrix
from torchnmf.plotting import top_features


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
        (["fit", "X.xlsx", "--rank", "2"], "unknown input format"),
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
    assert "must hold counts (non-negative integers), but row 0, column 0 holds 0.5" in capsys.readouterr().err
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


def labelled_csv(tmp_path, X, name="cells.csv", noise=0.0):
    import pandas as pd

    df = pd.DataFrame(X + noise, index=[f"Cell_{i}" for i in range(X.shape[0])],
                      columns=[f"Gene{j}" for j in range(X.shape[1])])
    df.to_csv(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("model", ["nmf", "gamma-poisson"])
def test_labelled_csv_names_reach_the_outputs(tmp_path, data, model, capsys):
    path = labelled_csv(tmp_path, data)
    rc, out = fit(tmp_path, path, "--model", model, "--rank", 2)
    assert rc == 0, capsys.readouterr().err
    with np.load(f"{out}.npz") as z:
        W, rows, cols = z["W"], z["row_names"], z["col_names"]
    assert rows[0] == "Cell_0" and list(cols) == [f"Gene{j}" for j in range(9)]
    summary = json.loads(open(f"{out}.json").read())
    assert summary["row_names"] and summary["col_names"] and summary["rounded"] == 0
    comps = summary["components"]
    assert len(comps) == 2 and sum(c["share"] for c in comps) == pytest.approx(1, abs=1e-5)
    assert summary["feature_ranking"] == "specificity"
    for c in comps:  # the top features by specificity, and by raw loading
        k = c["component"]
        assert c["top_features"] == [f"Gene{j}" for j in top_features(W, k, 10, "specificity")]
        assert c["top_features_by_loading"] == [f"Gene{j}" for j in np.argsort(-W[:, k], kind="stable")[:9]]


def test_transpose_and_ten_x_directory(tmp_path, data, capsys):
    from test_io import write_10x

    write_10x(tmp_path / "tenx", data, gz=True)
    rc, out = fit(tmp_path, tmp_path / "tenx", "--model", "gamma-poisson", "--rank", 2)
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(open(f"{out}.json").read())
    assert summary["shape"] == [25, 9] and isinstance(summary["components"][0]["top_features"][0], str)
    rc, out = fit(tmp_path, tmp_path / "tenx", "--rank", 2, "--transpose")
    assert rc == 0
    with np.load(f"{out}.npz") as z:
        assert z["W"].shape == (25, 2) and z["col_names"][0] == "AAAC0000-1"


def test_float_noise_counts_are_rounded_and_reported(tmp_path, data, capsys):
    path = labelled_csv(tmp_path, data, noise=1e-11)
    rc, out = fit(tmp_path, path, "--model", "gamma-poisson", "--rank", 2)
    assert rc == 0, capsys.readouterr().err
    n = data.size
    assert json.loads(open(f"{out}.json").read())["rounded"] == n
    assert f"{n} values rounded to counts" in capsys.readouterr().out
    frac = data.copy()
    frac[3, 4] += 0.25
    path = labelled_csv(tmp_path, frac, name="frac.csv")
    rc, _ = fit(tmp_path, path, "--model", "pnmf", "--rank", 2)
    err = capsys.readouterr().err
    assert rc == 2 and "frac.csv" in err and "row 3 (Cell_3), column 4 (Gene4)" in err and "--round" in err
    rc, out = fit(tmp_path, path, "--model", "pnmf", "--rank", 2, "--round")
    assert rc == 0 and json.loads(open(f"{out}.json").read())["rounded"] == 1


def test_nan_error_names_file_and_entry(tmp_path, data, capsys):
    X = data.copy()
    X[2, 1] = np.nan
    np.save(tmp_path / "holes.npy", X)
    rc, _ = fit(tmp_path, tmp_path / "holes.npy", "--rank", 2)
    err = capsys.readouterr().err
    assert rc == 2 and "holes.npy contains NaN" in err and "row 2, column 1" in err and err.count("\n") == 1


@pytest.mark.parametrize("rank", ["10", "1000000000000"])
def test_rank_above_min_shape_is_one_line(tmp_path, data, capsys, rank):
    rc, _ = fit(tmp_path, write(tmp_path, data, ".npy"), "--rank", rank)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--rank {rank} is larger than min(n_samples, n_features) = 9" in err


def test_output_directory_and_directory_input(tmp_path, data, capsys):
    path = write(tmp_path, data, ".npy")
    (tmp_path / "res").mkdir()
    for out in (str(tmp_path / "res") + "/", str(tmp_path / "res")):
        assert main(["fit", str(path), "--rank", "2", "--max-iter", "3", "--quiet", "-o", out]) == 0
        assert sorted(os.listdir(tmp_path / "res")) == ["X.json", "X.npz"]  # no hidden .npz
    assert main(["plot", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "X.png").exists()
    (tmp_path / "x.npy").mkdir()
    assert main(["fit", str(tmp_path / "x.npy"), "--rank", "2", "-o", str(tmp_path / "o")]) == 2
    assert "x.npy: it is a directory, not a .npy file" in capsys.readouterr().err


def test_outputs_are_atomic_and_json_last(tmp_path, data, monkeypatch, capsys):
    path = write(tmp_path, data, ".npy")
    rc, out = fit(tmp_path, path, "--rank", 2)
    assert rc == 0
    old_npz, old_json = open(f"{out}.npz", "rb").read(), open(f"{out}.json").read()

    def killed(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", killed)
    rc, _ = fit(tmp_path, path, "--rank", 3)
    assert rc == 2 and "cannot write" in capsys.readouterr().err
    # the previous result is whole and its summary still matches it
    assert open(f"{out}.npz", "rb").read() == old_npz and open(f"{out}.json").read() == old_json
    monkeypatch.undo()
    monkeypatch.setattr(json, "dump", killed)
    rc, _ = fit(tmp_path, path, "--rank", 3)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "No space left" in err
    # issue 22 item 2: a failed JSON write used to leave the new .npz beside the old .json
    assert open(f"{out}.npz", "rb").read() == old_npz and open(f"{out}.json").read() == old_json
    assert sorted(os.listdir(tmp_path)) == ["X.npy", "res.json", "res.npz"]  # no temporary files left
    monkeypatch.undo()
    W, summary = read_fit(str(out))[0]["W"], read_fit(str(out))[1]
    assert W.shape == (9, 2) and summary["rank"] == 2 and len(summary["fit_id"]) == 32


def test_mismatched_output_pair_is_refused(tmp_path, data, capsys):
    pytest.importorskip("matplotlib")
    path = write(tmp_path, data, ".npy")
    rc, out = fit(tmp_path, path, "--rank", 2)
    assert rc == 0
    old_json = open(f"{out}.json").read()
    rc, _ = fit(tmp_path, path, "--rank", 2, "--seed", 1)
    assert rc == 0
    with open(f"{out}.json", "w") as fh:  # as a kill between the two renames would leave them
        fh.write(old_json)
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "res.npz and" in err and "are from different fits" in err
    assert not os.path.exists(f"{out}.png")
    with pytest.raises(ValueError, match="different fits"):
        read_fit(str(out))
    # a pair written before fit_id existed (neither file has one) is still read
    with np.load(f"{out}.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "fit_id"}
    np.savez(f"{out}.npz", **arrays)
    summary = json.loads(old_json)
    del summary["fit_id"]
    with open(f"{out}.json", "w") as fh:
        json.dump(summary, fh)
    assert read_fit(str(out))[0]["W"].shape == (9, 2)


def test_stale_temporary_outputs_are_removed(tmp_path, data):
    path = write(tmp_path, data, ".npy")
    dead = 2 ** 22 + 17  # above Linux's largest pid: no such process
    stale = [f".res.npz.{dead}.abcd1234.tmp", ".res.json.x7Gq_k2a.tmp", f".res.json.{dead}.zz.tmp"]
    live = f".res.npz.{os.getppid()}.abcd1234.tmp"  # a writer that still runs: kept
    for name in stale + [live, ".other.npz.1.a.tmp"]:
        (tmp_path / name).write_bytes(b"half")
    rc, out = fit(tmp_path, path, "--rank", 2)
    assert rc == 0
    assert sorted(os.listdir(tmp_path)) == sorted([".other.npz.1.a.tmp", live, "X.npy", "res.json", "res.npz"])


def test_version_device_default_and_singular(tmp_path, data, capsys):
    from torchnmf import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"torchnmf {__version__}"
    assert main(["fit", "--help"]) == 0
    assert "(default: auto)" in capsys.readouterr().out
    rc = main(["fit", str(write(tmp_path, data, ".npy")), "--rank", "2", "--max-iter", "1", "--quiet",
               "--device", "cpu", "-o", str(tmp_path / "one")])
    assert rc == 0 and ", 1 iteration," in capsys.readouterr().out


def test_plot_image_shape_and_named_bars(tmp_path, data, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    rc, out = fit(tmp_path, labelled_csv(tmp_path, data), "--rank", 3)
    assert rc == 0
    assert main(["plot", str(out), "--image-shape", "3", "3"]) == 0
    fig = figures[-1]
    images = [a for a in fig.axes if a.images]
    # history, its twin axis (relative change against the tolerance), one image per component
    assert len(fig.axes) == 5 and len(images) == 3
    assert any(ln.get_label().startswith("tol = ") for a in fig.axes for ln in a.get_lines())
    assert all(a.images[0].get_array().shape == (3, 3) for a in images)
    assert main(["plot", str(out), "--top", "4", "--components", "2"]) == 0
    fig = figures[-1]
    bars = [a for a in fig.axes if a.patches]
    assert len(bars) == 2
    labels = [t.get_text() for t in bars[0].get_yticklabels()]
    assert len(labels) == 4 and all(t.startswith("Gene") for t in labels)
    assert bars[0].get_xlabel() == "specificity"  # the default ranking of the bars
    assert main(["plot", str(out), "--image-shape", "2", "4"]) == 2


@pytest.mark.parametrize("cell, match", [("1O", "line 2: '1O' at row 0, column 0 (g0) is not a number"),
                                         ("-", "line 2: '-' at row 0, column 0 (g0) is not a number"),
                                         ("NA", "contains NaN or infinity, first at row 0, column 0 (g0)")])
def test_csv_first_cell_typo_is_one_line_not_a_shorter_fit(tmp_path, data, capsys, cell, match):
    # issue 22 item 1: one odd first cell used to turn the first column into row labels
    path = write(tmp_path, data, ".csv")
    lines = path.read_text().splitlines()
    lines[1] = cell + lines[1][lines[1].index(","):]
    path.write_text("\n".join(lines) + "\n")
    rc, out = fit(tmp_path, path, "--rank", 2)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and match in err and "Traceback" not in err
    assert not os.path.exists(f"{out}.npz")


def test_missing_device_is_one_line(tmp_path, data, capsys):
    # issue 22 item 9: torch knows 'mps' by name; using it on a machine without it was a traceback
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        pytest.skip("this machine has mps")
    rc = main(["fit", str(write(tmp_path, data, ".npy")), "--rank", "2", "--max-iter", "2", "--quiet",
               "--device", "mps", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--device mps is not usable here" in err and "Traceback" not in err


def _damage(out, how):
    with np.load(f"{out}.npz") as z:
        arrays = dict(z)
    if how == "json list":
        with open(f"{out}.json", "w") as fh:
            json.dump([1, 2], fh)
        return "is not a torchnmf fit summary (a JSON object), it holds a list"
    if how == "1-D W":
        arrays["W"] = arrays["W"][:, 0]
        match = "W must be a 2-D array of numbers, got shape (9,)"
    elif how == "0 components":
        arrays["W"], arrays["H"] = arrays["W"][:, :0], arrays["H"][:, :0]
        match = "W of shape (9, 0) holds no component"
    elif how == "NaN W":
        arrays["W"][3, 1] = np.nan
        match = "W holds NaN or infinite values"
    elif how == "negative W":
        arrays["W"][3, 1] = -1.0
        match = "W holds negative values"
    elif how == "tol text":
        summary = json.loads(open(f"{out}.json").read())
        summary["tol"] = "small"
        with open(f"{out}.json", "w") as fh:
            json.dump(summary, fh)
        return "tol must be a number >= 0 or null, got 'small'"
    else:  # truncated archive
        data = open(f"{out}.npz", "rb").read()
        with open(f"{out}.npz", "wb") as fh:
            fh.write(data[: len(data) // 2])
        return "cannot read"
    np.savez(f"{out}.npz", **arrays)
    return match


@pytest.mark.parametrize("how", ["json list", "1-D W", "0 components", "NaN W", "negative W", "tol text",
                                 "truncated npz"])
def test_plot_of_damaged_outputs_is_one_line(tmp_path, data, capsys, how):
    # issue 22 item 9: each of these was a traceback
    pytest.importorskip("matplotlib")
    rc, out = fit(tmp_path, write(tmp_path, data, ".npy"), "--rank", 2)
    assert rc == 0
    match = _damage(out, how)
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchnmf: error:") and match in err, err
    assert "Traceback" not in err and not os.path.exists(f"{out}.png")


def test_unexpected_failure_is_one_line_unless_debug(tmp_path, data, monkeypatch, capsys):
    from torchnmf.estimators.nmf import BetaNMF

    def broken(self, X, y=None):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(BetaNMF, "fit_transform", broken)
    args = ["fit", str(write(tmp_path, data, ".npy")), "--rank", "2", "--quiet", "--device", "cpu",
            "-o", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == "torchnmf: error: RuntimeError: something inside broke (--debug shows the traceback)\n"
    with pytest.raises(RuntimeError):
        main(args + ["--debug"])

    def no_memory(self, X, y=None):
        raise MemoryError("Unable to allocate 7.45 GiB")

    monkeypatch.setattr(BetaNMF, "fit_transform", no_memory)
    assert main(args) == 2
    assert "torchnmf: error: out of memory (Unable to allocate 7.45 GiB)" in capsys.readouterr().err


def test_huge_claimed_size_is_one_line(tmp_path, capsys):
    # issue 22 item 3: the reader allocated gigabytes and the CLI died with a traceback
    path = tmp_path / "huge.mtx"
    path.write_text("%%MatrixMarket matrix coordinate real general\n300000000 5 1\n1 1 3\n")
    assert main(["fit", str(path), "--rank", "1", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge.mtx: the header claims 300000000 x 5 with 1 entries" in err


# -- issue 23.6 / 23.7: a fast command line, passive OpenMP threads ------------------------------
def _cli_subprocess(code, env_extra=None):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys; from torchnmf.cli import main; codes = [main(['--help']), main(['fit', '--help']), "
            "main(['fit', '--rank', '2', '-o', 'x', '--max-iters', '5']), main(['fitt'])]; "
            "print(codes, 'torch' in sys.modules, 'sklearn' in sys.modules)")
    out = _cli_subprocess(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2] False False"
    # a flag the subcommand does not know points at the subcommand's help
    assert "unrecognized arguments: --max-iters (see 'torchnmf fit --help')" in out.stderr


def test_openmp_threads_sleep_unless_the_user_chose():
    code = "import os; from torchnmf.cli import main; main(['--version']); print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _cli_subprocess(code).stdout.strip().splitlines()[-1] == "PASSIVE"
    assert _cli_subprocess(code, {"OMP_WAIT_POLICY": "ACTIVE"}).stdout.strip().splitlines()[-1] == "ACTIVE"
    # too late once torch is imported (OpenMP has read it): left alone
    late = "import torch; " + code
    assert _cli_subprocess(late).stdout.strip().splitlines()[-1] == "None"


@pytest.mark.parametrize("device, advice", [("cuda", "cuda is not available here; use --device auto"),
                                            ("quantum", "use auto, cpu or cuda"), ("meta", "use auto, cpu or cuda")])
def test_device_advice_in_command_line_words(tmp_path, data, capsys, monkeypatch, device, advice):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    np.save(tmp_path / "x.npy", data)
    assert main(["fit", str(tmp_path / "x.npy"), "--rank", "2", "--device", device, "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: " in err and advice in err and "device=" not in err


# -- issue 21.3: .h5ad in, .h5ad out --------------------------------------------------------------
def _adata(hv=True):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 1.0, (40, 3)) @ rng.gamma(1.0, 1.0, (3, 12))).astype(np.float32)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(12)])
    if hv:
        var["highly_variable"] = np.arange(12) % 3 != 0  # 8 of 12
    adata = anndata.AnnData(X=np.log1p(counts), obs=pd.DataFrame(index=[f"cell{i}" for i in range(40)]), var=var)
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata


@pytest.mark.parametrize("model", ["nmf", "gamma-poisson"])
def test_h5ad_input_writes_out_h5ad_with_the_results(tmp_path, capsys, model):
    import anndata

    adata = _adata()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    before = path.read_bytes()
    out = tmp_path / "res"
    rc = main(["fit", str(path), "--model", model, "--rank", "3", "--layer", "counts", "--max-iter", "30",
               "--quiet", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert path.read_bytes() == before  # the input is only read
    key = {"nmf": "nmf", "gamma-poisson": "gamma_poisson"}[model]
    res = anndata.read_h5ad(f"{out}.h5ad")
    fit, summary = read_fit(str(out))
    assert summary["files"]["anndata"] == f"{out}.h5ad" and "-> " in capsys.readouterr().out
    assert res.uns[key]["params"]["fit_id"] == summary["fit_id"]  # the three files are one fit
    np.testing.assert_allclose(res.obsm[f"X_{key}"], fit["H"])
    hv = np.asarray(res.var["highly_variable"])
    assert res.varm[key].shape == (12, 3) and not res.varm[key][~hv].any()  # genes not used: zero loadings
    np.testing.assert_allclose(res.varm[key][hv], fit["W"])
    assert list(fit["col_names"]) == list(res.var_names[hv])
    assert res.uns[key]["params"]["use_highly_variable"] and res.uns[key]["params"]["layer"] == "counts"
    assert f"{key}_1" in res.obs.columns and res.uns[key]["top_features"].shape == (8, 3)
    # all genes with --no-use-highly-variable; a later run over the output replaces the results
    rc = main(["fit", f"{out}.h5ad", "--model", model, "--rank", "2", "--layer", "counts", "--max-iter", "5",
               "--no-use-highly-variable", "--quiet", "-o", str(tmp_path / "again")])
    assert rc == 0, capsys.readouterr().err
    again = anndata.read_h5ad(tmp_path / "again.h5ad")
    assert again.obsm[f"X_{key}"].shape == (40, 2) and f"{key}_3" not in again.obs.columns
    assert bool(again.varm[key].any(axis=1).all()) or again.varm[key].shape == (12, 2)


def test_h5ad_flags_and_failures(tmp_path, capsys):
    adata = _adata(hv=False)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "res"
    rc = main(["fit", str(path), "--rank", "2", "--layer", "counts", "--use-highly-variable", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "highly_variable" in err and "--use-highly-variable" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("res*"))  # nothing written
    npy = write(tmp_path, np.ones((5, 4)), ".npy")
    assert main(["fit", str(npy), "--rank", "2", "--use-highly-variable", "-o", str(out)]) == 2
    assert "applies to .h5ad input only" in capsys.readouterr().err
    # a failed h5ad write leaves the previous outputs whole
    assert main(["fit", str(path), "--rank", "2", "--layer", "counts", "--max-iter", "5", "--quiet",
                 "-o", str(out)]) == 0
    old = {ext: (tmp_path / f"res{ext}").read_bytes() for ext in (".npz", ".json", ".h5ad")}
    import anndata

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    mp = pytest.MonkeyPatch()
    mp.setattr(anndata.AnnData, "write_h5ad", boom)
    try:
        rc = main(["fit", str(path), "--rank", "3", "--layer", "counts", "--max-iter", "5", "--quiet", "-o", str(out)])
    finally:
        mp.undo()
    assert rc == 2 and "No space left" in capsys.readouterr().err
    assert {ext: (tmp_path / f"res{ext}").read_bytes() for ext in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.npy", "cells.h5ad", "res.h5ad", "res.json", "res.npz"]
