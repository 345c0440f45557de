"""Work estimates and limits (derive/core/budget.py): refused up front, with the estimate and the way out."""

from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest

import derive
from derive.arch.description import Repeat, as_dense_network, dense_network, load_arch
from derive.core import budget
from derive.core.errors import DeriveError


def test_check_refuses_over_the_work_limit_with_estimate_and_way_out():
    estimate = budget.gram(4, 10**9)
    assert estimate.ops == pytest.approx(1e9 * (10 * budget.GRAM_ENTRY_OPS + budget.GRAM_LAYER_OPS))
    with pytest.raises(DeriveError) as info:
        budget.check(estimate, max_work=1e12)
    message = str(info.value)
    assert "\n" not in message and "1e13 operations" in message and "over the limit of 1e12" in message
    assert f"{budget.WORK_VARIABLE}=2e13" in message and "max_work=" in message
    assert budget.check(estimate, max_work=2e13) is estimate


def test_check_refuses_over_the_memory_limit():
    estimate = budget.gram(10**6, 1)  # the two 10^6 x 10^6 float64 results and tiles: 2.1 x 8e12 bytes
    words = r"needs about 15\.3 TB of memory, over the limit of 64 GB.*DERIVE_MAX_MEMORY=15647G"
    with pytest.raises(DeriveError, match=words):
        budget.check(estimate, max_work=math.inf, max_memory="64G")
    assert budget.check(estimate, max_work=math.inf, max_memory=math.inf) is estimate


def test_limits_from_environment_and_context(monkeypatch):
    monkeypatch.setenv(budget.WORK_VARIABLE, "5e3")
    monkeypatch.setenv(budget.MEMORY_VARIABLE, "2K")
    assert budget.work_limit() == 5e3 and budget.memory_limit() == 2048
    with budget.limits(max_work=7.0):
        assert budget.work_limit() == 7.0 and budget.memory_limit() == 2048
        with budget.limits(max_memory="1M"):
            assert budget.work_limit() == 7.0 and budget.memory_limit() == 2**20
    assert budget.work_limit() == 5e3
    monkeypatch.setenv(budget.WORK_VARIABLE, "lots")
    with pytest.raises(DeriveError, match="DERIVE_MAX_WORK must be a positive number"):
        budget.work_limit()
    monkeypatch.delenv(budget.WORK_VARIABLE)
    assert budget.work_limit() == budget.DEFAULT_MAX_WORK


@pytest.mark.parametrize("text, size", [("64G", 64 * 2**30), ("512 MiB", 512 * 2**20), ("1.5e10", 1.5e10),
                                        ("inf", math.inf), ("3kb", 3 * 2**10)])
def test_parse_bytes(text, size):
    assert budget.parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "-1G", "nan", "0", "64X", "1e3e3"])
def test_parse_bytes_refuses(text):
    with pytest.raises(DeriveError):
        budget.parse_bytes(text)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "many"])
def test_limits_must_be_positive(value):
    with pytest.raises(DeriveError, match="max_work must be a positive number"):
        budget.work_limit(value)


def test_estimates_grow_with_what_the_user_chooses():
    base = budget.dense_monte_carlo(100, 8, 64, 4, depth=3)
    assert budget.dense_monte_carlo(200, 8, 64, 4, depth=3).ops == pytest.approx(2 * base.ops)
    assert budget.dense_monte_carlo(100, 8, 128, 4, depth=3).ops > 3.5 * base.ops  # ~ width^2
    assert budget.dense_monte_carlo(100, 8, 64, 4, depth=30).ops > 9 * base.ops
    assert base.ops == pytest.approx(budget.monte_carlo(100, (8, 64, 64, 64), 4).ops)
    huge = budget.dense_monte_carlo(10**12, 8, 10**9, 3, depth=10**9)  # no per-layer lists
    assert huge.ops > 1e40 and math.isfinite(huge.ops)
    assert budget.finite_width_tensor(20, 3, 1).ops == pytest.approx(3 * 2 * 20**6)


def test_dense_network_of_any_depth_stays_small():
    net = dense_network("relu", 10**12, 2.0)
    assert len(net.items) == 2 and isinstance(net.items[1], Repeat) and net.items[1].times == 10**12 - 1
    dense = as_dense_network(net)
    assert dense.depth == 10**12 and dense.hyperparameter("C_W") == 2.0
    assert sum(net.layer_counts().values()) == 2 * 10**12 - 1


def test_gram_refused_before_any_work(monkeypatch):
    x = np.random.default_rng(0).standard_normal((4, 8))
    start = time.perf_counter()
    with pytest.raises(DeriveError, match="Gram matrices of 4 inputs through 1000000000 layers"):
        derive.gram("relu", x, 10**9, 2.0)
    with pytest.raises(DeriveError, match="over the limit of 1e3"):
        derive.gram("relu", x, 3, 2.0, max_work=1e3)
    assert time.perf_counter() - start < 30
    small = derive.gram("relu", x, 3, 2.0, max_work=1e6)
    assert np.all(np.isfinite(small.nngp))


def test_sampling_refused_before_any_work():
    with pytest.raises(DeriveError, match="networks per width at width 128.*DERIVE_MAX_WORK="):
        derive.validate("relu", 2.0, depth=3, width=128, samples=10**12)
    with pytest.raises(DeriveError, match="finite-width maps through 1000000000000 layers"):
        derive.finite_width("relu", 10**12, 2.0)


def test_architecture_files_are_bounded(tmp_path):
    layer = '[[layers]]\ntype = "dense"\nC_W = 2\n'
    (tmp_path / "many.toml").write_text(layer * 1001)
    with pytest.raises(DeriveError, match="1001 layer tables, more than 1000"):
        load_arch(tmp_path / "many.toml")
    (tmp_path / "big.toml").write_text("# " + "x" * 2**20 + "\n" + layer)
    with pytest.raises(DeriveError, match="more than the 1048576 read"):
        load_arch(tmp_path / "big.toml")
    (tmp_path / "negative.toml").write_text(layer.replace("2", "-2"))
    with pytest.raises(DeriveError, match="C_W is a variance"):
        load_arch(tmp_path / "negative.toml")
    body = ('[[layers.body]]\ntype = "activation"\nactivation = "tanh"\n'
            '[[layers.body]]\ntype = "dense"\nC_W = 1\n')
    nested = body.replace("[[layers.body", "[[layers")
    for _ in range(40):
        nested = '[[layers]]\ntype = "repeat"\ntimes = 2\n' + nested.replace("[[layers", "[[layers.body")
    (tmp_path / "nested.toml").write_text(layer + nested)
    net = load_arch(tmp_path / "nested.toml")
    assert sum(net.layer_counts().values()) == 1 + 2 * 2**40
    assert "nested repeats" in as_dense_network(net)
    with pytest.raises(DeriveError, match="operations"):
        derive.arch_gram(net, np.ones((2, 3)))


def test_budget_imports_neither_jax_nor_sympy():
    tree = ast.parse(Path(budget.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and not imported & {"jax", "sympy", "numpy"}
