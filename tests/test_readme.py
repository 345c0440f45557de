"""Every command and Python snippet of the README runs as written.

The tour's commands run in a temporary folder holding the input files they name (x.npy, y.npy,
xt.npy, images.npy); each must exit with status 0 (``derive validate`` may also exit 1, a failed
statistical check, which is a result, not an error). The Python blocks run as scripts from the
repository root. Slow: the tour samples and trains thousands of networks, as a user would.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _tour() -> list[list[str]]:
    start = README.index("## A tour of the command")
    block = re.search(r"```bash\n(.*?)```", README[start:], flags=re.S).group(1)
    commands = []
    for line in block.splitlines():
        if line.startswith("derive "):
            words = shlex.split(line, comments=True)
            commands.append(words[1:])
    return commands


def test_the_readme_has_what_these_tests_run():
    assert len(_tour()) >= 20
    assert len(_blocks("python")) >= 2
    quick_start = _blocks("bash")[:2]
    assert quick_start[0].strip().endswith("derive kernel --activation relu")
    assert quick_start[1].strip().endswith("pytest -q")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tour")
    rng = np.random.default_rng(0)
    np.save(path / "x.npy", rng.standard_normal((8, 5)))
    np.save(path / "y.npy", np.sin(rng.standard_normal(8)))
    np.save(path / "xt.npy", rng.standard_normal((4, 5)))
    np.save(path / "images.npy", rng.standard_normal((3, 8, 2)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("args", _tour(), ids=lambda a: " ".join(a)[:60])
def test_tour_command_runs_as_written(args, folder):
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=folder,
                         env=env, timeout=1800)
    allowed = (0, 1) if args[0] in ("validate", "validate-trained") else (0,)
    assert run.returncode in allowed, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippet_runs_as_written(index, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(_blocks("python")[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
