"""scripts/setup-venv.sh (used by run.sh and test.sh) installs once, then skips while .venv is current."""
import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path):
    """A copy of the script beside the two stamped files, and a .venv whose python only logs its calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "setup-venv.sh"), tmp_path / "scripts")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    python = bin_ / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls.log"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return tmp_path


def run(tree):
    subprocess.run(["bash", str(tree / "scripts" / "setup-venv.sh")], check=True, cwd="/",
                   stdin=subprocess.DEVNULL, timeout=60)
    log = tree / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_second_run_skips_install(tree):
    first = run(tree)
    assert any("pip install -q -e .[test,docs]" in c for c in first) and any("torch==" in c for c in first)
    assert (tree / ".venv" / ".torchnmf-stamp").exists()
    assert run(tree) == []  # current: nothing installed, not even pip started


def test_changed_setup_cfg_or_lost_stamp_reinstalls(tree):
    run(tree)
    with open(tree / "setup.cfg", "a") as fh:
        fh.write("\n# a new dependency\n")
    assert any("-e .[test,docs]" in c for c in run(tree))
    assert run(tree) == []
    (tree / ".venv" / ".torchnmf-stamp").unlink()
    assert any("-e .[test,docs]" in c for c in run(tree))


def test_failed_install_leaves_no_stamp(tree):
    python = tree / ".venv" / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(subprocess.CalledProcessError):
        run(tree)
    assert not (tree / ".venv" / ".torchnmf-stamp").exists()


def test_readme_commands_use_the_setup_script():
    for script in ("run.sh", "test.sh"):
        text = open(os.path.join(ROOT, "scripts", script)).read()
        assert "bash scripts/setup-venv.sh" in text
