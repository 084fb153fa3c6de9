"""Data-parallel fitting: 2 CPU processes with gloo equal one process; dead peers; checkpoints."""
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from torchnmf.distributed import (CheckpointError, Checkpointer, DistributedTimeoutError, all_reduce_stats, barrier, broadcast_,
                                  check_shards, find_free_port, get_rank, get_world_size, init, is_distributed,
                                  shard_range, shard_rows, stats_reducer)
from torchnmf.history import History
from torchnmf.nmf import NMF
from torchnmf.parallel import fit_gamma_cavi, fit_gamma_svi, fit_nmf, fit_nmf_online
from torchnmf.poisson import GammaPoisson
from torchnmf.trainer import NaturalGradient, OnlineMU

N, C, R = 24, 10, 3
F64 = torch.float64


def _data():
    g = torch.Generator().manual_seed(42)
    V = torch.poisson(torch.rand(N, R, generator=g, dtype=F64) @ torch.rand(R, C, generator=g, dtype=F64) * 4,
                      generator=g)
    W0 = torch.rand(C, R, generator=g, dtype=F64) + 0.1
    H0 = torch.rand(N, R, generator=g, dtype=F64) + 0.1
    return V, W0, H0


def _gamma():
    return GammaPoisson(N, C, R, dtype=F64, generator=torch.Generator().manual_seed(3))


def _svi_batches(n_steps=3, bs=4):
    """Rows of the union of both processes' batches at each step (shuffle off, shards of 12)."""
    return [torch.cat([torch.arange(4 * i, 4 * i + bs), 12 + torch.arange(4 * i, 4 * i + bs)]) for i in range(n_steps)]


# -- multi-process harness ---------------------------------------------------------
def _entry(rank, world, port, job, out, timeout):
    torch.set_num_threads(1)  # two processes on a shared machine: no thread oversubscription
    try:
        init("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
        result = globals()[job](rank, world, out)
    except BaseException as err:  # reported to the parent, which asserts on it
        result = {"error": type(err).__name__, "message": str(err)}
    path = os.path.join(out, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)  # the parent sees a complete file or none
    os._exit(0)  # skip process-group teardown: after a failure it may wait on the dead peer


# fork (where available) spares each process the seconds of importing torch again; set
# TORCHNMF_TEST_START_METHOD=spawn to run the same tests with freshly spawned interpreters.
START_METHOD = os.environ.get("TORCHNMF_TEST_START_METHOD",
                              "fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _launch(job, tmp_path, world=2, timeout=20.0, wait=60.0, need=None):
    """Run ``job`` in ``world`` gloo processes; return each rank's result once ranks ``need`` reported."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch's lazy imports, once, before forking
    port = find_free_port()
    ctx = mp.start_processes(_entry, args=(world, port, job, str(tmp_path), timeout), nprocs=world, join=False,
                             start_method=START_METHOD)
    need = range(world) if need is None else need
    deadline = time.time() + wait
    while time.time() < deadline and not all((tmp_path / f"rank{r}.pt").exists() for r in need):
        if not any(p.is_alive() for p in ctx.processes):
            break
        time.sleep(0.05)
    time.sleep(0.2)  # let a finished process close its file
    for p in ctx.processes:
        if p.is_alive():  # only processes this test started
            p.kill()
        p.join()
    return {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
            for r in range(world) if (tmp_path / f"rank{r}.pt").exists()}


def _job_equal(rank, world, out):
    res = {"rank": get_rank(), "world": get_world_size()}
    V, W0, H0 = _data()
    rows = shard_range(N)
    # NMF, dense KL and sparse Euclidean with a general beta
    m = NMF(W=W0, H=H0[rows.start:rows.stop])
    res["nmf_iter"] = fit_nmf(m, V[rows.start:rows.stop], beta=1, tol=0, max_iter=15)
    res["nmf"] = (m.W.detach().clone(), m.H.detach().clone())
    m = NMF(W=W0, H=H0[rows.start:rows.stop])
    Vs, _ = shard_rows(V.to_sparse())
    hist = History()
    fit_nmf(m, Vs, beta=1.5, tol=0, max_iter=6, history=hist)
    res["nmf_sparse"] = (m.W.detach().clone(), m.H.detach().clone(), hist.values)
    # Gamma-Poisson CAVI: statistics summed over processes
    g = _gamma()
    h = fit_gamma_cavi(g, V[rows.start:rows.stop], max_iter=6, tol=0)
    res["cavi"] = {k: v.detach().clone() for k, v in g.state_dict().items()}
    res["cavi_elbo"] = h.values
    # online MU: each process steps on its own batch, statistics summed
    W = W0.clone()
    opt = OnlineMU([W], beta=1, forget_factor=0.5, n_samples=N, inner_iter=3, distributed=True)
    H = H0[rows.start:rows.stop].clone()
    for s in range(0, len(rows), 4):
        Hb = H[s:s + 4]
        opt.step(lambda: (V[rows.start + s:rows.start + s + 4], Hb))
    res["online"] = (W, H)
    # streaming fits run and agree across processes
    m = NMF(W=W0)
    fit_nmf_online(m, V.numpy(), batch_size=4, epochs=2, shuffle=True)
    res["online_fit"] = m.W.detach().clone()
    g = _gamma()
    hs = fit_gamma_svi(g, V.numpy(), batch_size=4, epochs=1, shuffle=False, local_tol=0, local_iters=3)
    res["svi"] = {k: v.detach().clone() for k, v in g.state_dict().items()}
    res["svi_elbo"] = hs.values
    # shards that do not match the world: every process raises the same error, none hangs
    for name, kwargs in (("n_shards", dict(n_shards=3)), ("index", dict(shard_index=0)),
                         ("cols", dict(n_cols=C + rank))):
        try:
            check_shards(len(rows), kwargs.pop("n_cols", C), **kwargs)
            res[f"bad_{name}"] = None
        except ValueError as err:
            res[f"bad_{name}"] = str(err)
    try:
        fit_nmf(NMF(W=W0, H=H0[rows.start:rows.stop]), V[rows.start:rows.stop], max_iter=2, n_shards=4)
        res["bad_fit"] = None
    except ValueError as err:
        res["bad_fit"] = str(err)
    # checkpoints: a file per process, an epoch counts once both wrote it
    m = NMF(W=W0, H=H0[rows.start:rows.stop])
    fit_nmf(m, V[rows.start:rows.stop], tol=0, max_iter=4, check_every=1, checkpoint=os.path.join(out, "ckpt"),
            checkpoint_every=2)
    res["ckpt_W"] = m.W.detach().clone()
    # helpers
    res["reduced"] = all_reduce_stats({"a": torch.tensor([rank + 1.0]), "b": torch.ones(2, dtype=F64)})
    t = torch.full((2,), float(rank))
    broadcast_([t], src=1)
    res["broadcast"] = t
    barrier(timeout=5)
    return res


def test_two_processes_equal_one(tmp_path):
    res = _launch("_job_equal", tmp_path)
    assert set(res) == {0, 1}, res
    for r in (0, 1):
        assert "error" not in res[r], res[r]
        assert res[r]["rank"] == r and res[r]["world"] == 2
    V, W0, H0 = _data()

    # NMF: the same as NMF.fit on the whole matrix
    ref = NMF(W=W0, H=H0)
    n = ref.fit(V, beta=1, tol=0, max_iter=15)
    assert res[0]["nmf_iter"] == n == 15
    for r in (0, 1):
        rows = shard_range(N, r, 2)
        torch.testing.assert_close(res[r]["nmf"][0], ref.W.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[r]["nmf"][1], ref.H.detach()[rows.start:rows.stop], rtol=1e-10, atol=1e-12)
    ref = NMF(W=W0, H=H0)
    hist = History()
    ref.fit(V.to_sparse(), beta=1.5, tol=0, max_iter=6, history=hist)
    for r in (0, 1):
        rows = shard_range(N, r, 2)
        torch.testing.assert_close(res[r]["nmf_sparse"][0], ref.W.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[r]["nmf_sparse"][1], ref.H.detach()[rows.start:rows.stop], rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(res[r]["nmf_sparse"][2], hist.values, rtol=1e-12)

    # Gamma-Poisson CAVI: global posterior, ELBO and each shard's rows equal GammaPoisson.fit
    g = _gamma()
    h = g.fit(V, max_iter=6, tol=0)
    full = g.state_dict()
    for r in (0, 1):
        rows = shard_range(N, r, 2)
        np.testing.assert_allclose(res[r]["cavi_elbo"], h.values, rtol=1e-11)
        for k, v in full.items():
            got = res[r]["cavi"][k]
            if v.dim() and v.shape[0] == N:  # row-local state: only the shard's rows are fitted here
                got, v = got[rows.start:rows.stop], v[rows.start:rows.stop]
            torch.testing.assert_close(got, v, rtol=1e-10, atol=1e-12, msg=f"{k} on rank {r}")

    # online MU: as one process stepping on the union of the batches
    W, H = W0.clone(), H0.clone()
    opt = OnlineMU([W], beta=1, forget_factor=0.5, n_samples=N, inner_iter=3)
    for s in range(0, 12, 4):
        idx = torch.cat([torch.arange(s, s + 4), 12 + torch.arange(s, s + 4)])
        Hb = H[idx]
        opt.step(lambda: (V[idx], Hb))
        H[idx] = Hb
    for r in (0, 1):
        rows = shard_range(N, r, 2)
        torch.testing.assert_close(res[r]["online"][0], W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[r]["online"][1], H[rows.start:rows.stop], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res[0]["online_fit"], res[1]["online_fit"], rtol=0, atol=0)
    assert bool(torch.isfinite(res[0]["online_fit"]).all())

    # SVI: as NaturalGradient on the union of the batches (scale N / 8)
    g = _gamma()
    trainer = NaturalGradient(g, local_tol=0, local_iters=3)
    for idx in _svi_batches():
        trainer.step(lambda: (V[idx], idx))
    for r in (0, 1):
        torch.testing.assert_close(res[r]["svi"]["alpha_shape"], g.state_dict()["alpha_shape"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[r]["svi"]["lambda_"], g.state_dict()["lambda_"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res[0]["svi_elbo"], res[1]["svi_elbo"], rtol=1e-12)

    # checkpoints of the 2-process job: both ranks' files; a 1-process job may not resume them
    ck = Checkpointer(tmp_path / "ckpt")
    assert ck.epochs() == [1, 3]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == [
        f"epoch0000000{e}-rank0000{r}.pt" for e in (1, 3) for r in (0, 1)]
    with pytest.raises(ValueError, match="written by 2 processes but this job has 1"):
        fit_nmf(NMF(W=W0, H=H0), V, max_iter=5, checkpoint=tmp_path / "ckpt")
    torch.testing.assert_close(res[0]["ckpt_W"], res[1]["ckpt_W"], rtol=0, atol=0)

    # mismatched shards: the same clear error on both processes
    for r in (0, 1):
        assert "2 processes" in res[r]["bad_n_shards"] and "3" in res[r]["bad_n_shards"]
        assert "exactly one process" in res[r]["bad_index"]
        assert "columns" in res[r]["bad_cols"]
        assert "4" in res[r]["bad_fit"] and "2 processes" in res[r]["bad_fit"]
        assert res[r]["reduced"]["a"].item() == 3.0
        torch.testing.assert_close(res[r]["reduced"]["b"], torch.full((2,), 2.0, dtype=F64))
        assert res[r]["broadcast"].tolist() == [1.0, 1.0]


class _Dies(History):
    """Kills its process (no cleanup, as a crash) when the fit records its ``at``-th value."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def append(self, record):
        if len(self) + 1 == self.at:
            os._exit(1)
        return super().append(record)


class _Hangs(_Dies):
    def append(self, record):
        if len(self) + 1 == self.at:
            time.sleep(30)  # stuck: the peers must not wait for it
        return super().append(record)


def _job_peer_fails(rank, world, out, history_cls):
    V, W0, H0 = _data()
    rows = shard_range(N)
    m = NMF(W=W0, H=H0[rows.start:rows.stop])
    hist = history_cls(at=3) if rank == 1 else History()
    start = time.time()
    try:
        fit_nmf(m, V[rows.start:rows.stop], tol=0, max_iter=50, history=hist, timeout=2.0)
    except DistributedTimeoutError as err:
        return {"error": type(err).__name__, "message": str(err), "seconds": time.time() - start,
                "is_timeout": isinstance(err, TimeoutError), "records": len(hist)}
    return {"error": None}


def _job_peer_dies(rank, world, out):
    return _job_peer_fails(rank, world, out, _Dies)


def _job_peer_hangs(rank, world, out):
    return _job_peer_fails(rank, world, out, _Hangs)


@pytest.mark.parametrize("job", ["_job_peer_dies", "_job_peer_hangs"])
def test_failed_peer_raises_clear_error_instead_of_hanging(tmp_path, job):
    start = time.time()
    res = _launch(job, tmp_path, wait=40.0, need=[0])
    assert time.time() - start < 40
    assert 0 in res, "rank 0 neither finished nor reported"
    r0 = res[0]
    assert r0["error"] == "DistributedTimeoutError", r0
    assert r0["is_timeout"]
    assert "rank 0 of 2" in r0["message"] and "peer process died" in r0["message"]
    if job == "_job_peer_dies":  # a reset connection ends the wait at once: say so, not "within 2 s"
        assert "failed after" in r0["message"] and "before the 2 s timeout" in r0["message"], r0["message"]
        assert "did not complete within" not in r0["message"]
    else:
        assert "did not complete within 2 s" in r0["message"], r0["message"]
    assert r0["seconds"] < 15
    assert r0["records"] == 3  # the peer died after the collective of its 3rd record


# -- one process: checkpoints --------------------------------------------------------
class _Crash(History):
    """Raises (as a killed job would stop) when the fit records its ``at``-th value."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def append(self, record):
        if len(self) + 1 == self.at:
            raise KeyboardInterrupt("simulated crash")
        return super().append(record)


def test_fit_nmf_resumes_from_checkpoint_identically(tmp_path):
    V, W0, H0 = _data()
    ref = NMF(W=W0, H=H0)
    ref_hist = History()
    n_ref = fit_nmf(ref, V, tol=0, max_iter=9, history=ref_hist, check_every=1)
    crashed = NMF(W=W0, H=H0)
    with pytest.raises(KeyboardInterrupt):
        fit_nmf(crashed, V, tol=0, max_iter=9, checkpoint=tmp_path, checkpoint_every=2, history=_Crash(at=7),
                check_every=1)
    assert Checkpointer(tmp_path).epochs() == [3, 5]  # iterations 4 and 6 done, 2 kept
    resumed = NMF(W=W0, H=H0)
    hist = History()
    n = fit_nmf(resumed, V, tol=0, max_iter=9, checkpoint=tmp_path, checkpoint_every=2, history=hist,
                check_every=1)
    assert n == n_ref == 9
    assert torch.equal(resumed.W, ref.W) and torch.equal(resumed.H, ref.H)
    assert hist.values == ref_hist.values


def test_fit_gamma_cavi_resumes_from_checkpoint_identically(tmp_path):
    V, _, _ = _data()
    ref = _gamma()
    h_ref = fit_gamma_cavi(ref, V, max_iter=7, tol=0)
    with pytest.raises(KeyboardInterrupt):
        fit_gamma_cavi(_gamma(), V, max_iter=7, tol=0, checkpoint=tmp_path, checkpoint_every=3, history=_Crash(at=5))
    layer = _gamma()
    h = fit_gamma_cavi(layer, V, max_iter=7, tol=0, checkpoint=tmp_path, checkpoint_every=3)
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert h.values == h_ref.values
    assert [e.to_dict() for e in h.elbos] == [e.to_dict() for e in h_ref.elbos]


def test_streaming_fits_resume_from_checkpoint_identically(tmp_path):
    V, W0, _ = _data()
    ref = NMF(W=W0)
    fit_nmf_online(ref, V, batch_size=5, epochs=4, seed=1)
    with pytest.raises(KeyboardInterrupt):
        fit_nmf_online(NMF(W=W0), V, batch_size=5, epochs=4, seed=1, checkpoint=tmp_path / "nmf",
                       history=_Crash(at=3))
    m = NMF(W=W0)
    assert fit_nmf_online(m, V, batch_size=5, epochs=4, seed=1, checkpoint=tmp_path / "nmf") == 4
    assert torch.equal(m.W, ref.W)

    ref = _gamma()
    h_ref = fit_gamma_svi(ref, V, batch_size=5, epochs=3, seed=2)
    with pytest.raises(KeyboardInterrupt):
        fit_gamma_svi(_gamma(), V, batch_size=5, epochs=3, seed=2, checkpoint=tmp_path / "svi",
                      history=_Crash(at=2))
    layer = _gamma()
    h = fit_gamma_svi(layer, V, batch_size=5, epochs=3, seed=2, checkpoint=tmp_path / "svi")
    assert len(h) == 3
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert h.values == h_ref.values


def test_checkpoint_from_another_world_size_is_refused(tmp_path):
    ck = Checkpointer(tmp_path, every=1)
    ck.save(0, {"x": torch.ones(2)})
    assert ck.load()[0] == 1 and torch.equal(ck.load()[1]["x"], torch.ones(2))
    manifest = tmp_path / Checkpointer.MANIFEST
    info = json.loads(manifest.read_text())
    info["world_size"] = 2
    manifest.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="written by 2 processes but this job has 1"):
        ck.load()


def test_checkpointer_keeps_the_last_complete_ones(tmp_path):
    ck = Checkpointer(tmp_path, every=2, keep=2)
    assert ck.load() is None
    saved = [e for e in range(8) if ck.maybe_save(e, {"epoch": torch.tensor(e)})]
    assert saved == [1, 3, 5, 7]
    assert ck.epochs() == [5, 7]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch00000005-rank00000.pt", "epoch00000007-rank00000.pt"]
    nxt, state = ck.load()
    assert nxt == 8 and int(state["epoch"]) == 7
    with pytest.raises(ValueError, match="every"):
        Checkpointer(tmp_path, every=0)
    with pytest.raises(TypeError, match="directory"):
        Checkpointer(3)


# -- damaged checkpoint directories (what killed jobs leave) ---------------------------
def _damage(path, how):
    """Simulate a save killed mid-write or a disk error."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:  # a readable file holding something else
        torch.save({"not": "a checkpoint"}, path)


def test_killed_saves_leave_nothing_behind_after_the_next_save(tmp_path):
    ck = Checkpointer(tmp_path, every=1, keep=2)
    for e in range(3):
        ck.save(e, {"x": torch.full((4,), float(e))})
    # what kills at every moment of a save leave: temporaries of the file and the manifest,
    # a checkpoint written before the manifest was updated, and one of a crashed later run
    for name in ("epoch00000003-rank00000.pt.tmp4242", "epoch00000009-rank00000.pt.tmp77", "latest.json.tmp4242"):
        (tmp_path / name).write_bytes(b"\0" * 1000)
    torch.save({"epoch": 3, "rank": 0, "world_size": 1, "state": {}}, tmp_path / "epoch00000003-rank00000.pt")
    torch.save({"epoch": 5, "rank": 0, "world_size": 1, "state": {}}, tmp_path / "epoch00000005-rank00000.pt")
    assert ck.epochs() == [1, 2]
    assert ck.load()[0] == 3  # the orphans are not listed: never resumed from
    assert not list(tmp_path.glob("*.tmp*"))  # a (re)start clears the temporaries
    (tmp_path / "epoch00000003-rank00000.pt.tmp4242").write_bytes(b"x")
    ck.save(3, {"x": torch.full((4,), 3.0)})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch00000002-rank00000.pt", "epoch00000003-rank00000.pt", "latest.json"]
    assert ck.epochs() == [2, 3] and torch.equal(ck.load()[1]["x"], torch.full((4,), 3.0))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "foreign"])
def test_a_damaged_checkpoint_is_named_and_skipped(tmp_path, how):
    ck = Checkpointer(tmp_path, every=1, keep=3)
    for e in range(3):
        ck.save(e, {"x": torch.full((4,), float(e))})
    newest = tmp_path / "epoch00000002-rank00000.pt"
    _damage(newest, how)
    with pytest.raises(CheckpointError, match=str(newest).replace("/", ".")):
        ck.load(fallback=False)
    with pytest.warns(RuntimeWarning, match="epoch00000002-rank00000.pt"):
        nxt, state = ck.load()
    assert nxt == 2 and torch.equal(state["x"], torch.full((4,), 1.0))
    # the resumed run saves over it, and later saves keep working
    for e in range(2, 5):
        ck.save(e, {"x": torch.full((4,), float(e))})
    assert ck.epochs() == [2, 3, 4] and ck.load()[0] == 5
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, every=1, keep=2)
    for e in range(2):
        ck.save(e, {"x": torch.ones(2)})
    for p in tmp_path.glob("*.pt"):
        _damage(p, "truncated")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as info:
        ck.load()
    msg = str(info.value)
    assert "epoch00000000-rank00000.pt" in msg and "epoch00000001-rank00000.pt" in msg and "truncated" in msg
    (tmp_path / "epoch00000001-rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match="epoch00000001-rank00000.pt' is missing"):
        ck.load(fallback=False)
    ck.save(0, {"x": torch.zeros(2)})  # starting afresh in the same directory works
    assert ck.epochs() == [0] and torch.equal(ck.load()[1]["x"], torch.zeros(2))


@pytest.mark.parametrize("content", [b"", b'{"epoch": 2, "world_si', b"\xff\xfe\x00garbage", b"[1, 2]",
                                     b'{"epoch": 1, "world_size": 1, "complete": "x"}'])
def test_a_corrupt_manifest_falls_back_to_the_files(tmp_path, content):
    ck = Checkpointer(tmp_path, every=1, keep=2)
    for e in range(3):
        ck.save(e, {"x": torch.full((2,), float(e))})
    manifest = tmp_path / Checkpointer.MANIFEST
    manifest.write_bytes(content)
    with pytest.raises(CheckpointError, match="latest.json"):
        ck.load(fallback=False)
    with pytest.warns(RuntimeWarning, match="latest.json"):
        assert ck.epochs() == [1, 2]
    with pytest.warns(RuntimeWarning, match="latest.json"):
        nxt, state = ck.load()
    assert nxt == 3 and torch.equal(state["x"], torch.full((2,), 2.0))
    with pytest.warns(RuntimeWarning, match="latest.json"):
        ck.save(3, {"x": torch.full((2,), 3.0)})
    assert json.loads(manifest.read_text())["complete"] == [2, 3]  # rewritten: no more warnings
    assert ck.load()[0] == 4


def test_fit_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    V, W0, H0 = _data()
    ref = NMF(W=W0, H=H0)
    ref_hist = History()
    fit_nmf(ref, V, tol=0, max_iter=9, history=ref_hist, check_every=1)
    with pytest.raises(KeyboardInterrupt):
        fit_nmf(NMF(W=W0, H=H0), V, tol=0, max_iter=9, checkpoint=tmp_path, checkpoint_every=2,
                history=_Crash(at=7), check_every=1)
    _damage(tmp_path / "epoch00000005-rank00000.pt", "truncated")
    (tmp_path / "epoch00000007-rank00000.pt.tmp999").write_bytes(b"half a file")
    resumed, hist = NMF(W=W0, H=H0), History()
    with pytest.warns(RuntimeWarning, match="epoch00000005-rank00000.pt"):
        n = fit_nmf(resumed, V, tol=0, max_iter=9, checkpoint=tmp_path, checkpoint_every=2, history=hist,
                    check_every=1)
    assert n == 9  # resumed after iteration 4 (epoch 3) and redid 5..9
    assert torch.equal(resumed.W, ref.W) and torch.equal(resumed.H, ref.H)
    assert hist.values == ref_hist.values
    assert Checkpointer(tmp_path).epochs() == [5, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch00000005-rank00000.pt", "epoch00000007-rank00000.pt", "latest.json"]

    ref = _gamma()
    h_ref = fit_gamma_cavi(ref, V, max_iter=7, tol=0)
    with pytest.raises(KeyboardInterrupt):
        fit_gamma_cavi(_gamma(), V, max_iter=7, tol=0, checkpoint=tmp_path / "g", checkpoint_every=2,
                       history=_Crash(at=6))
    (tmp_path / "g" / Checkpointer.MANIFEST).write_text('{"epoch": 3, "wor')
    layer = _gamma()
    with pytest.warns(RuntimeWarning, match="latest.json"):
        h = fit_gamma_cavi(layer, V, max_iter=7, tol=0, checkpoint=tmp_path / "g", checkpoint_every=2)
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert h.values == h_ref.values


def _job_damaged_checkpoint(rank, world, out):
    ck = Checkpointer(os.path.join(out, "ckpt"), every=1, keep=3, timeout=10)
    for e in range(3):
        ck.save(e, {"x": torch.full((2,), 10.0 * rank + e)})
    barrier(timeout=10)
    if rank == 1:  # only rank 1's newest file is damaged: rank 0 must not resume from it alone
        _damage(__import__("pathlib").Path(ck._file(2, 1)), "truncated")
    barrier(timeout=10)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nxt, state = ck.load()
    ck.save(2, {"x": torch.full((2,), 10.0 * rank + 2)})
    return {"next": nxt, "x": state["x"], "warned": [str(w.message) for w in caught], "after": ck.load()[0]}


def test_processes_agree_on_the_newest_checkpoint_all_can_read(tmp_path):
    res = _launch("_job_damaged_checkpoint", tmp_path)
    assert set(res) == {0, 1}, res
    for rank in (0, 1):
        assert "error" not in res[rank], res[rank]
        assert res[rank]["next"] == 2 and torch.equal(res[rank]["x"], torch.full((2,), 10.0 * rank + 1))
        assert res[rank]["after"] == 3
    assert any("epoch00000002-rank00001.pt" in w for w in res[1]["warned"])


def test_distributed_failure_message_says_what_happened():
    from torchnmf.distributed import _failure_message
    reset = _failure_message(None, "all_reduce of W", 300.0, 0.61, RuntimeError("Connection reset by peer"))
    assert "failed after 0.61 s, before the 300 s timeout" in reset and "reset" in reset
    assert "within 300 s" not in reset
    late = _failure_message(None, "broadcast", 300.0, 300.2, RuntimeError("Timed out"))
    assert "did not complete within 300 s" in late and "rank 0 of 1: broadcast" in late


# -- one process: helpers ----------------------------------------------------------------
def test_single_process_world_and_helpers():
    assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
    stats = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=F64)}
    out = all_reduce_stats(stats)
    assert out["a"] is stats["a"] and out.keys() == stats.keys()
    with pytest.raises(ValueError, match="op"):
        all_reduce_stats(stats, op="mean")
    with pytest.raises(TypeError, match="stats\\['s'\\]"):
        all_reduce_stats({"s": torch.eye(2).to_sparse()})
    reduce = stats_reducer(("a",))
    mixed = {"a": torch.ones(1), "rows": None, "scale": 2.0}
    assert reduce(mixed) == mixed and reduce(mixed) is not mixed
    assert check_shards(5, 3) == (0, 5)
    with pytest.raises(ValueError, match="1 processes"):
        check_shards(5, 3, n_shards=2)
    with pytest.raises(ValueError, match="at least one row"):
        check_shards(0, 3)
    barrier()
    t = torch.ones(2)
    broadcast_([t])
    assert t.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="backend"):
        init("carrier-pigeon")
    with pytest.raises(ValueError, match="timeout"):
        init("gloo", timeout=-1)
    assert issubclass(DistributedTimeoutError, RuntimeError) and issubclass(DistributedTimeoutError, TimeoutError)
    assert not is_distributed()  # nothing was initialised by the failed calls


def test_shard_range_and_rows():
    parts = [shard_range(10, r, 3) for r in range(3)]
    assert parts == [range(0, 3), range(3, 6), range(6, 10)]
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="every process needs a row"):
        shard_range(2, 0, 3)
    import scipy.sparse as sp

    X = torch.arange(20.0).reshape(10, 2)
    for src in (X, X.numpy(), X.to_sparse(), sp.csr_matrix(X.numpy()), X.to_sparse_csr()):
        part, rows = shard_rows(src, 1, 3)
        dense = part.toarray() if hasattr(part, "toarray") else (part.to_dense() if isinstance(part, torch.Tensor)
                                                                 and part.layout != torch.strided else part)
        np.testing.assert_array_equal(np.asarray(dense), X.numpy()[3:6])
        assert rows == range(3, 6)


def test_fit_functions_validate_before_work():
    V, W0, H0 = _data()
    m = NMF(W=W0, H=H0)
    before = (m.W.clone(), m.H.clone(), V.clone())
    with pytest.raises(TypeError, match="NMF"):
        fit_nmf(torch.nn.Linear(2, 2), V)
    with pytest.raises(ValueError, match="shape"):
        fit_nmf(m, V[:5])
    with pytest.raises(ValueError, match="non-negative"):
        fit_nmf(m, -V)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit_nmf(m, V, checkpoint_every=0)
    with pytest.raises(ValueError, match="rows"):
        fit_gamma_cavi(_gamma(), V, rows=torch.arange(N))
    with pytest.raises(TypeError, match="conjugate"):
        fit_gamma_cavi(m, V)
    with pytest.raises(ValueError, match="columns"):
        fit_nmf_online(NMF(W=torch.rand(C + 1, R, dtype=F64)), V)
    with pytest.raises(ValueError, match="shape"):
        fit_gamma_svi(GammaPoisson(N + 1, C, R, dtype=F64), V)
    assert torch.equal(m.W, before[0]) and torch.equal(m.H, before[1]) and torch.equal(V, before[2])


def test_fit_nmf_is_nmf_fit_with_one_process():
    V, W0, H0 = _data()
    mask = (torch.rand(N, C) > 0.2).double()
    for kwargs in (dict(beta=2), dict(beta=0.5, alpha=0.1, l1_ratio=0.5), dict(beta=1, mask=mask)):
        a, b = NMF(W=W0, H=H0), NMF(W=W0, H=H0)
        Vp = V + 0.5
        assert a.fit(Vp, tol=0, max_iter=5, **kwargs) == fit_nmf(b, Vp, tol=0, max_iter=5, **kwargs)
        torch.testing.assert_close(a.W, b.W, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.H, b.H, rtol=1e-12, atol=0)
    fixed = NMF(W=W0, H=H0, trainable_W=False)
    fit_nmf(fixed, V, max_iter=3)
    assert torch.equal(fixed.W, W0)
    hist = History()
    hist.request_stop()
    assert fit_nmf(NMF(W=W0, H=H0), V, history=hist) == 0


def test_fit_nmf_online_decreases_divergence():
    V, W0, _ = _data()
    hist = History()
    m = NMF(W=W0)
    assert fit_nmf_online(m, V, batch_size=6, epochs=6, forget_factor=0.5, history=hist) == 6
    assert hist.values[-1] < hist.values[0]
    assert bool((m.W >= 0).all())


def test_processes_with_fewer_batches_wrap_around():
    from torchnmf.parallel import _batches
    from torchnmf.streaming import row_loader

    loader = row_loader(np.ones((7, 2)), 3, shuffle=True, seed=4)
    once = [b.rows.tolist() for b in _batches(loader, 2, 3)]
    assert sorted(sum(once, [])) == list(range(7))
    more = [b.rows.tolist() for b in _batches(loader, 2, 5)]
    assert more == once + once[:2]  # the same epoch's order, started over


def test_fit_gamma_svi_is_natural_gradient_over_the_loader_batches():
    V, _, _ = _data()
    layer = _gamma()
    hist = fit_gamma_svi(layer, V, batch_size=10, epochs=2, shuffle=False, local_iters=2, tau0=2.0)
    ref = _gamma()
    trainer = NaturalGradient(ref, local_iters=2, tau0=2.0)
    last = []
    for _ in range(2):
        for s in range(0, N, 10):
            rows = torch.arange(s, min(N, s + 10))
            estimate = trainer.step(lambda: (V[rows], rows))
        last.append(float(estimate.total))
    # one record per epoch: the estimate of its last step (the other steps compute none)
    assert len(hist) == 2
    np.testing.assert_allclose(hist.values, last, rtol=1e-12)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-12, atol=0, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
def test_fits_on_cuda_match_cpu():
    V, W0, H0 = _data()
    cpu, gpu = NMF(W=W0, H=H0), NMF(W=W0, H=H0).cuda()
    fit_nmf(cpu, V.to_sparse(), tol=0, max_iter=5)
    fit_nmf(gpu, V.to_sparse().cuda(), tol=0, max_iter=5)
    torch.testing.assert_close(gpu.W.cpu(), cpu.W, rtol=1e-8, atol=1e-10)
    a, b = NMF(W=W0), NMF(W=W0).cuda()
    fit_nmf_online(a, V, batch_size=6, epochs=2)
    fit_nmf_online(b, V, batch_size=6, epochs=2)
    torch.testing.assert_close(b.W.cpu(), a.W, rtol=1e-8, atol=1e-10)
    g, h = _gamma(), _gamma().cuda()
    fit_gamma_cavi(g, V, max_iter=3, tol=0)
    fit_gamma_cavi(h, V.cuda(), max_iter=3, tol=0)
    torch.testing.assert_close(h.alpha_shape.cpu(), g.alpha_shape, rtol=1e-8, atol=1e-10)


def test_a_process_that_never_joins_is_reported():
    start = time.time()
    with pytest.raises(DistributedTimeoutError, match="not every process joined within 1 s"):
        init("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=2, timeout=1)
    assert time.time() - start < 20
    assert not is_distributed()
