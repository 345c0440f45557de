"""Progress of long runs: on stderr (a line per stage when stderr is not a terminal), never on stdout,
silenced by progress=False, and a callable sees every chunk up to the total."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import derive
from derive import arch

ROOT = Path(__file__).resolve().parents[1]
X = np.random.default_rng(0).standard_normal((3, 4))
NET = arch.serial(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.0))


@pytest.mark.slow
def test_stages_are_lines_on_stderr_and_nothing_on_stdout(capsys):
    derive.sample("tanh", X, 8, 2, 1.5, 0.1, n_networks=6)
    derive.validate(NET, widths=(4, 8), samples=5, quantities=("K",))
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert "derive: sampling 6 networks of width 8..." in lines
    assert sum(line.startswith("derive: sampling 5 networks of width") and line.endswith("...") for line in lines) == 2
    assert sum(": done in " in line for line in lines) == 3


@pytest.mark.slow
def test_progress_false_is_silent(capsys):
    derive.sample(NET, X, 8, n_networks=6, progress=False)
    derive.monte_carlo_check("tanh", X, 2, 1.5, width=8, n_networks=4, progress=False)
    assert capsys.readouterr() == ("", "")


def test_a_callable_sees_every_chunk_up_to_the_total(capsys):
    seen = []
    derive.sample(NET, X, 8, n_networks=9, progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 9
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_json_on_stdout_stays_clean():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "cli", "validate", "--activation", "tanh", "--cw", "1.5", "--depth", "2",
                          "--width", "8", "--samples", "20", "--format", "json"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert run.returncode in (0, 1), run.stderr
    json.loads(run.stdout)
    assert "derive: sampling networks..." in run.stderr and ": done in " in run.stderr
