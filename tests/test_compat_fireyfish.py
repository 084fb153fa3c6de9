"""The fireyfish README's code runs on the adapter with only its import line changed."""
import threading
import time

import numpy as np
import pytest
import scipy.sparse
import torch

from gamma_helpers import simulate_gamma
from torchnmf.compat import fireyfish
from torchnmf.poisson import GammaPoisson
from torchnmf.trainer import CAVI

IMPORT = "from torchnmf.compat import fireyfish; from torchnmf.compat.fireyfish import Trainer"

# The README's usage and inspection code (../shared/seeds/fireyfish-README.md), import line changed.
README = IMPORT + """
Nfactors=20
model=fireyfish.PoisModel(countmatrix,Nfactors,batchsize=100000,rho=1)
model.initialize()
model.double() # (optionally) do it in double precision
model.cuda()   # (optionally) do it on the GPU
trainer=Trainer(model)
trainer.go(500) # train for 500 iterations
parameters= model.save_params(parms)

dataterms = [x.Z for x in trainer.elbos]
kls = [(x.U_kls,x.alpha_kls) for x in trainer.elbos]
elbos = [x.total for x in trainer.elbos] # <-- elbo.total = elbo.Z - elbo.U_kls - elbo.alpha_kls
"""


def test_readme_code_runs():
    X = simulate_gamma(30, 25, 3)[0]
    countmatrix = scipy.sparse.csr_matrix(X.numpy())
    code = README if torch.cuda.is_available() else README.replace("model.cuda()", "pass")  # CPU-only CI
    env = {"countmatrix": countmatrix, "parms": {}}
    exec(compile(code, "fireyfish-README", "exec"), env)
    trainer, p = env["trainer"], env["parameters"]
    assert len(trainer.elbos) == 500
    totals = np.array([float(e) for e in env["elbos"]])
    assert (np.diff(totals) >= -1e-9 * np.abs(totals[1:])).all()
    for d, (ku, ka), t in zip(env["dataterms"], env["kls"], env["elbos"]):
        np.testing.assert_allclose(float(t), float(d - ku - ka), rtol=1e-12)
    assert p.sU.shape == p.rU.shape == (30, 20) and p.salpha.shape == p.ralpha.shape == (25, 20)
    assert p.kappas.shape == (30,) and p.lambdas.shape == (25,) and p.sU.dtype == np.float64
    assert set(env["parms"]) == {"sU", "rU", "kappas", "salpha", "ralpha", "lambdas"}
    np.testing.assert_array_equal(countmatrix.toarray(), X.numpy())  # input untouched


def test_same_numbers_as_gamma_poisson():
    X = simulate_gamma(30, 25, 3)[0]
    model = fireyfish.PoisModel(X, 3, rho=0.5).double()  # 0.5: exact in the float32 it is built in
    model.initialize(torch.Generator().manual_seed(0))
    ref = GammaPoisson(30, 25, 3, a=0.5, b=0.5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trainer, cavi = fireyfish.Trainer(model), CAVI(ref)
    trainer.go(5)
    records = [cavi.step(lambda: X) for _ in range(5)]
    for got, want in zip(trainer.elbos, records):
        for name in ("Z", "U_kls", "alpha_kls", "total"):
            np.testing.assert_allclose(float(getattr(got, name)), float(getattr(want, name)), rtol=1e-10)
    p = model.save_params()
    np.testing.assert_allclose(p.salpha, ref.alpha_shape.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(p.kappas, ref.kappa.numpy(), rtol=1e-10)


def test_keepgoing_stops_a_go_in_another_thread():
    X = simulate_gamma(30, 25, 3)[0]
    trainer = fireyfish.Trainer(fireyfish.PoisModel(X, 3))
    job = threading.Thread(target=trainer.go, args=(10 ** 7,))
    job.start()
    while len(trainer.elbos) < 3:
        time.sleep(0.01)
    trainer.KEEPGOING = False
    job.join(60)
    assert not job.is_alive()
    n = len(trainer.elbos)
    assert 3 <= n < 10 ** 7
    trainer.go(2)  # a new go starts again
    assert len(trainer.elbos) == n + 2


def test_bad_arguments():
    X = simulate_gamma(10, 8, 2)[0]
    with pytest.raises(ValueError, match="Nfactors"):
        fireyfish.PoisModel(X, 0)
    with pytest.raises(ValueError, match="rho"):
        fireyfish.PoisModel(X, 2, rho=-1)
    with pytest.raises(ValueError, match=r"countmatrix must hold counts \(non-negative integers\), but row 0, column 0 holds"):
        fireyfish.PoisModel(X + 0.5, 2)
    with pytest.raises(TypeError, match="PoisModel"):
        fireyfish.Trainer(torch.nn.Linear(2, 2))
