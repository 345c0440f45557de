"""The one engine: the dense network is an architecture, and every entry point goes through it.

The Gram fast path (tiles, fused NNGP/NTK, homogeneous forms) serves dense networks with uniform
hyperparameters, whichever way they are described; anything else is evaluated layer by layer, and
both agree. The facade's finite-width entry point takes an activation or an architecture.
"""

import numpy as np
import pytest

import derive
from derive import arch
from derive.core.errors import DeriveError
from derive.kernels.arch import arch_kernels
from derive.kernels.engine import dense_plan, network_gram

X = np.random.default_rng(3).standard_normal((6, 5))


@pytest.mark.parametrize("name,cw,cb,rtol", [("relu", 2.0, 0.1, 1e-12), ("erf", 1.2, 0.0, 1e-12),
                                             ("tanh", 1.5, 0.05, 1e-9)])  # tanh: quadrature (tol 1e-11 a layer)
@pytest.mark.slow
def test_the_dense_fast_path_equals_the_layer_by_layer_kernels(name, cw, cb, rtol):
    net = arch.dense_network(name, 5, cw, cb)
    assert dense_plan(net) is not None
    fast = network_gram(net, X)
    slow = arch_kernels(net, X).output
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-13)
    api = derive.gram(name, X, 5, cw, cb)
    np.testing.assert_array_equal(api.nngp, fast[0])
    np.testing.assert_array_equal(api.ntk, fast[1])


def test_an_architecture_file_of_a_dense_network_takes_the_fast_path(tmp_path):
    path = tmp_path / "mlp.toml"
    path.write_text("[[layers]]\ntype = 'dense'\nC_W = 2\nC_b = 0.1\n[[layers]]\ntype = 'repeat'\ntimes = 3\n"
                    "  [[layers.body]]\n  type = 'activation'\n  activation = 'relu'\n"
                    "  [[layers.body]]\n  type = 'dense'\n  C_W = 2\n  C_b = 0.1\n")
    net = arch.load_arch(path)
    assert dense_plan(net) == dense_plan(arch.dense_network("relu", 4, 2.0, 0.1))
    res = derive.arch_gram(str(path), X)
    np.testing.assert_array_equal(res.nngp, derive.gram("relu", X, 4, 2.0, 0.1).nngp)


@pytest.mark.parametrize("net", [
    arch.dense_network("tanh", 3, [1.0, 1.5, 1.5], 0.1),  # per-layer variances
    arch.serial(arch.dense(1.0), arch.residual(arch.dense(1.0), arch.activation("relu"), arch.dense(1.0))),
    arch.serial(arch.dense(1.0), arch.activation("relu"), arch.dense(2.0), arch.activation("tanh"), arch.dense(1.0)),
])
def test_other_architectures_go_layer_by_layer(net):
    assert dense_plan(net) is None
    K, Theta = network_gram(net, X)
    ref = arch_kernels(net, X).output
    np.testing.assert_array_equal(K, ref[0])
    with pytest.raises(DeriveError, match="dense networks"):
        network_gram(net, X, method="tiled")


@pytest.mark.slow
def test_finite_width_facade_takes_an_activation_or_an_architecture():
    dense = derive.finite_width("relu", depth=4, C_W=2.0, k1=1.0)  # V grows by 5 K^2 a layer (PDLT 5.x)
    np.testing.assert_allclose(dense.values["V"], [0.0, 5.0, 10.0, 15.0], rtol=1e-13)
    net = arch.dense_network("relu", 4, 2.0, 0.0)
    walked = derive.finite_width(net, width=64)
    np.testing.assert_allclose(walked.values["V"], 4 * dense.values["V"], rtol=1e-13)  # K^(1) = 2 here
    cnn = derive.finite_width("examples/architectures/cnn.toml")
    assert np.asarray(cnn.values["V"][2]).shape == (3, 3, 3, 3)
    with pytest.raises(DeriveError, match="depth and C_W"):
        derive.finite_width("relu")
    with pytest.raises(DeriveError, match="sets its own depth"):
        derive.finite_width(net, depth=3)
    assert derive.arch.serial is arch.serial


@pytest.mark.slow
def test_criticality_and_validate_take_an_activation_or_an_architecture():
    assert derive.criticality("relu").cls == "scale-invariant"
    crit = derive.criticality(arch.dense_network("relu", 3, 2.0, 0.0))
    assert crit.chi_perp[-1] == pytest.approx(1.0) and crit.chi_par[-1] == pytest.approx(1.0)
    dense = derive.validate("relu", 2.0, 0.0, 2, width=64, samples=50, inputs=X[:2])
    assert dense.passed
    net = arch.dense_network("tanh", 2, 1.5, 0.1)
    batch = derive.validate(net, width=64, samples=50, inputs=X[:2])
    assert batch.passed
    with pytest.raises(DeriveError, match="width"):
        derive.validate(net)
