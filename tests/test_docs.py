"""The Sphinx site builds with zero warnings (``sphinx-build -W``), as CI requires."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sphinx_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    cmd = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
           os.path.join(ROOT, "docs"), str(tmp_path / "html")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert (tmp_path / "html" / "api.html").exists()
    assert (tmp_path / "html" / "introduction.html").exists()
