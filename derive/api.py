"""The public API: thin, pure functions over the pipeline stages.

    rules -> parse -> expectations/recursions (SymPy) -> codegen (JAX) -> gram / Monte Carlo

Symbolic functions (:func:`kernel`) never import JAX; numeric ones import it on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from derive.arch.description import Serial, dense_network, load_arch
from derive.backends.precision import float64
from derive.core import budget
from derive.core import symbols as S
from derive.core.display import markdown_table, matrix_table, rounded, upper_entries
from derive.core.errors import DeriveError
from derive.core.inputs import check_hyperparameters, check_inputs
from derive.kernels.engine import network_gram
from derive.rules.activations import Activation, as_activation
from derive.symbolic.quadrature import DEFAULT_TOL
from derive.symbolic.recursions import KernelDerivation, derive_kernel, numeric_kernel_expressions

ActivationLike = str | Activation


def _is_architecture(spec) -> bool:
    return isinstance(spec, Serial) or hasattr(spec, "__fspath__") or (isinstance(spec, str) and spec.endswith(".toml"))


def _as_net(net) -> Serial:
    """An architecture, or the path of an architecture file."""
    if isinstance(net, Serial):
        return net
    if isinstance(net, str) or hasattr(net, "__fspath__"):
        return load_arch(net)
    raise DeriveError(f"expected an architecture (derive.arch.serial(...)) or the path of an architecture file, "
                      f"got {type(net).__name__}")


def activation(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None,
               rule_dirs: Sequence[str] = ()) -> Activation:
    """Resolve a rule name (``"relu"``), alias, or expression in z (``"z*erf(z)"``)."""
    return as_activation(spec, params, rule_dirs)


def kernel(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None, *,
           tol: float = DEFAULT_TOL, rule_dirs: Sequence[str] = ()) -> KernelDerivation:
    """Derive the infinite-width kernel and NTK recursions of a dense network with activation ``spec``.

    Returns a :class:`~derive.symbolic.recursions.KernelDerivation` with ``expectation`` = <sigma(z1)
    sigma(z2)>_K, ``derivative_expectation`` = <sigma'(z1) sigma'(z2)>_K (SymPy in K11, K12, K22),
    their single-input forms in K, and the recursions ``recursion``, ``ntk_recursion``,
    ``single_input``, ``single_input_ntk`` (PDLT eqs. 4.118 and 8.63).

    Example:
        >>> import derive
        >>> derive.kernel("relu").single_input
        C_W*K/2 + C_b
    """
    return derive_kernel(activation(spec, params, rule_dirs), tol=tol)


def criticality(spec, params: Mapping[str, str] | Sequence[str] | None = None, *,
                tol: float = DEFAULT_TOL, rule_dirs: Sequence[str] = (), k0: float = 1.0):
    """Universality class and critical initialisations of an activation (see
    :mod:`derive.symbolic.critical`), or, for an architecture (``derive.arch.serial(...)`` or a file),
    the single-input kernel and susceptibilities of every block from ``K = k0``
    (:func:`derive.symbolic.arch_criticality.arch_criticality`).

    Example:
        >>> import derive
        >>> derive.criticality("tanh").cls
        'K*=0'
    """
    if _is_architecture(spec):
        from derive.symbolic.arch_criticality import arch_criticality

        return arch_criticality(_as_net(spec), k0)
    from derive.symbolic.critical import analyse

    return analyse(activation(spec, params, rule_dirs), tol=tol)


@dataclass(frozen=True, repr=False)
class GramResult:
    """NNGP and NTK Gram matrices K^(L), Theta^(L) of a batch (numpy, float64 unless asked)."""

    nngp: np.ndarray
    ntk: np.ndarray

    def _shape(self) -> str:
        return " x ".join(map(str, np.shape(self.nngp)))

    def __repr__(self) -> str:
        return f"GramResult(NNGP and NTK Gram matrices, {self._shape()}, {np.asarray(self.nngp).dtype})"

    def _repr_markdown_(self) -> str:
        return "\n".join([
            f"**Gram matrices** of the network's output, {self._shape()} ({np.asarray(self.nngp).dtype}; "
            "rows $a$, columns $b$)", "", "NNGP $K^{(L)}_{ab}$:", "", matrix_table(self.nngp, corner="$a$"), "",
            "NTK $\\Theta^{(L)}_{ab}$:", "", matrix_table(self.ntk, corner="$a$")])


@float64
def gram(spec: ActivationLike, inputs, depth: int, C_W: float, C_b: float = 0.0,
         lambda_W: float | None = None, lambda_b: float | None = None, *,
         params: Mapping[str, str] | Sequence[str] | None = None, dtype: str = "float64",
         method: str = "auto", devices=None, x_test=None, max_work: float | None = None,
         max_memory: float | str | None = None) -> GramResult:
    """NNGP and NTK Gram matrices of ``inputs`` (N, d) at depth L (L dense layers).

    With ``x_test`` (M, d), the blocks between the test and the training inputs instead:
    ``nngp[i, a]`` = K^(L)(x_test[i], inputs[a]), shape (M, N), the orientation of Neural Tangents'
    ``kernel_fn(x_test, x_train)`` (:func:`derive.kernels.engine.network_cross_gram`).

    The dense network ``dense, (activation, dense) x (L - 1)`` as an architecture
    (:func:`derive.arch.dense_network`) through :func:`derive.kernels.engine.network_gram`:
    K^(1) = C_b + C_W x.x'/d, Theta^(1) = lambda_b + lambda_W x.x'/d, then the recursions of
    :func:`kernel`; lambda_W, lambda_b default to C_W, C_b (Neural Tangents' NTK parametrisation).
    ``method`` ("auto", "tiled" or "direct") and ``devices`` (a count or a list of devices to
    shard the rows over) are those of :func:`derive.kernels.gram.gram_matrices`. The work is estimated
    first and refused over ``max_work`` operations or ``max_memory`` bytes (defaults: about ten minutes on a
    laptop and this machine's memory; :mod:`derive.core.budget`).
    """
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x = check_inputs(inputs)
    x2 = None if x_test is None else _same_features(check_inputs(x_test), x)
    with budget.limits(max_work, max_memory):
        net = dense_network(activation(spec, params), int(depth), C_W, C_b, lw, lb)
        if x2 is None:
            nngp, ntk = network_gram(net, x, dtype=dtype, method=method, devices=devices)
        else:
            nngp, ntk = network_gram(net, x2, x, dtype=dtype, method=method, devices=devices)
    return GramResult(nngp, ntk)


def _same_features(x_test: np.ndarray, x_train: np.ndarray) -> np.ndarray:
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DeriveError(f"test inputs have shape {x_test.shape} but training inputs {x_train.shape}: "
                          f"they must agree after the first axis")
    return x_test


@float64
def arch_gram(net, inputs, *, dtype: str = "float64", method: str = "auto", devices=None,
              x_test=None, max_work: float | None = None,
              max_memory: float | str | None = None) -> GramResult:
    """NNGP and NTK of an architecture's output for ``inputs`` (N, d) or (N, *positions, d)
    (:func:`derive.kernels.engine.network_gram`; dense networks take the fast Gram evaluation);
    with ``x_test`` the (M, N) test-train blocks, and ``max_work``, ``max_memory``, as in :func:`gram`."""
    x2 = None if x_test is None else _same_features(np.asarray(x_test), np.asarray(inputs))
    with budget.limits(max_work, max_memory):
        nngp, ntk = network_gram(_as_net(net), inputs if x2 is None else x2, None if x2 is None else inputs,
                                 dtype=dtype, method=method, devices=devices)
    return GramResult(nngp, ntk)


@float64
def predict(spec, x_train, y_train, x_test, depth: int | None = None, C_W=None, C_b=0.0, lambda_W=None,
            lambda_b=None, *, t=None, steps=None, learning_rate: float = 1.0, noise: float = 0.0,
            get=("nngp", "ntk"), covariance: str | None = "diagonal",
            params: Mapping[str, str] | Sequence[str] | None = None, chunk: int | None = None):
    """Predictions of infinitely wide networks on ``x_test`` after training on (``x_train``, ``y_train``).

    ``spec`` is an activation (then the dense network of ``depth`` layers with C_W, C_b, lambda_W,
    lambda_b, as in :func:`gram`) or an architecture (a description or a file; its output without
    positions). Returns a :class:`~derive.inference.predict.Prediction`: per mode ("nngp": the GP
    posterior, or only the last layer trained for time t; "ntk": the infinite ensemble trained by
    gradient descent on the MSE; "ntkgp": the GP posterior with the NTK as prior) the mean and the
    variances (``covariance="full"``: the (M, M) covariance) of the test outputs. ``t`` is the
    gradient-flow time (None: trained to convergence), ``steps`` the number of discrete gradient
    descent steps instead; ``noise`` the observation noise variance. Formulas and conventions (those of
    Neural Tangents' ``nt.predict``) in :mod:`derive.inference.infinite`.

    Example:
        >>> import numpy as np, derive
        >>> x = np.random.default_rng(0).normal(size=(20, 3)); y = np.sin(x[:, 0])
        >>> p = derive.predict("relu", x[:15], y[:15], x[15:], depth=3, C_W=2.0)
        >>> p.ntk.mean.shape, p.nngp.variance.shape
        ((5,), (5,))
    """
    from derive.inference.predict import predict_network

    if _is_architecture(spec):
        if depth is not None or C_W is not None:
            raise DeriveError("an architecture carries its own depth and variances; drop depth and C_W")
        net = _as_net(spec)
    else:
        if depth is None or C_W is None:
            raise DeriveError("predict with an activation needs depth and C_W (the dense network's)")
        C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
        net = dense_network(activation(spec, params), int(depth), C_W, C_b, lw, lb)
    x = check_inputs(x_train) if not _is_architecture(spec) else np.asarray(x_train, dtype=float)
    x2 = check_inputs(x_test) if not _is_architecture(spec) else np.asarray(x_test, dtype=float)
    _same_features(x2, x)
    return predict_network(net, x, y_train, x2, t=t, steps=steps, learning_rate=learning_rate, noise=noise,
                           get=get, covariance=covariance, chunk=chunk)


@float64
def validate_trained(spec, x_train, y_train, x_test, depth: int, C_W: float, C_b: float = 0.0, lambda_W=None,
                     lambda_b=None, *, widths=(32, 64, 128), n_networks: int = 1000, steps=(0, 50, 500),
                     learning_rate: float = 1.0, seed: int = 0, mode: str = "ntk", z_max: float = 5.0,
                     params: Mapping[str, str] | Sequence[str] | None = None, progress=True):
    """Infinite-width predictions against ensembles of dense networks trained by gradient descent.

    At each of ``widths`` (three or more), ``n_networks`` networks of ``depth`` dense layers are
    trained on (``x_train``, ``y_train``) for ``steps`` steps (checkpoints) of size ``learning_rate``
    on the MSE (:mod:`derive.sampling.training`); the ensemble mean and variance of every test output
    are fitted as a + b/n and the intercept compared with :func:`predict` (``mode`` "ntk"; "nngp" is
    the last-layer-only dynamics, which trained networks reject). Returns a
    :class:`~derive.validation.trained.TrainedValidation` (``passed``, rows with z-scores and the
    measured 1/n slopes, ``plot()``). ``progress``: True shows the training of each width on stderr
    (:mod:`derive.core.progress`), False nothing; a callable gets a message before each width.
    """
    from derive.validation.trained import validate_trained_dense

    if _is_architecture(spec):
        raise DeriveError("validate_trained trains dense networks: give an activation (architectures are not "
                          "trained yet)")
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x, x2 = check_inputs(x_train), check_inputs(x_test)
    _same_features(x2, x)
    for name, value, least in (("n_networks", n_networks, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise DeriveError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(z_max, (int, float)) and z_max > 0):
        raise DeriveError(f"z_max must be positive, got {z_max!r}")
    return validate_trained_dense(activation(spec, params), x, y_train, x2, int(depth), C_W, C_b, lw, lb,
                                  widths=widths, n_networks=int(n_networks), steps=steps,
                                  learning_rate=learning_rate, seed=int(seed), mode=mode, z_max=float(z_max),
                                  progress=progress)


def finite_width(spec, depth: int | None = None, C_W=None, C_b=0.0, lambda_W=None, lambda_b=None, *,
                 widths=None, k1: float | None = None, width: int | None = None, inputs=None,
                 params: Mapping[str, str] | Sequence[str] | None = None, tol: float = DEFAULT_TOL,
                 max_work: float | None = None, max_memory: float | str | None = None):
    """Order-1/n corrections of a dense network or of any architecture, from the layer rules.

    With an activation (a rule name, an expression in z or an :class:`Activation`), the dense network of
    ``depth`` layers: K, V, G1, Theta, A, B, D, F, P, Q per layer (PDLT ch. 4, 8, 11), a
    :class:`~derive.finite.single.FiniteWidthProfile`; C_W, C_b, lambda_W, lambda_b and ``widths``
    (n_1..n_L) may be per-layer sequences, ``k1`` sets K^(1); with ``inputs`` (N, d), the same network
    as an architecture over the batch (the tensor form below). With an architecture
    (``derive.arch.serial(...)`` or the path of an architecture file): one input without positions
    gives an :class:`~derive.finite.arch.ArchFiniteWidth` (``width`` the uniform width of its
    normalised columns); ``inputs`` (N, *positions, d), or an architecture with positions, the tensor
    form over every site (:class:`~derive.finite.tensor.TensorFiniteWidth`, with the NTK's
    fluctuations A, B, D, F over the sites through dense, conv, activation and pooling layers, residual
    blocks and LayerNorm followed by a weighted layer, and ``theta_var()``, n Var of one channel's
    NTK). ``max_work``,
    ``max_memory`` as for :func:`gram` (the walk costs about 2 ms a layer, the tensor form S^6 over S
    sites).

    Example:
        >>> import derive
        >>> p = derive.finite_width("relu", depth=4, C_W=2.0, k1=1.0)
        >>> [float(v) for v in p.values["V"]]
        [0.0, 5.0, 10.0, 15.0]
    """
    if not _is_architecture(spec):
        if depth is None or C_W is None:
            raise DeriveError("finite_width of a dense network needs depth and C_W")
        if width is not None:
            raise DeriveError("width is for an architecture's normalised columns; a dense network takes widths")
        if inputs is not None:  # a batch: the dense network as an architecture, through the tensor form
            if widths is not None or k1 is not None:
                raise DeriveError("with inputs the kernel comes from them (no k1) and the maps are coefficients "
                                  "of 1/n (no widths)")
            from derive.arch.description import dense_network
            from derive.finite.tensor import arch_finite_width_tensor

            with budget.limits(max_work, max_memory):
                net = dense_network(activation(spec, params), depth, C_W, C_b, lambda_W, lambda_b)
                return arch_finite_width_tensor(net, inputs, tol=tol)
        from derive.finite.single import check_depth, finite_width_maps, iterate

        with budget.limits(max_work, max_memory):
            check_depth(depth)
            maps = finite_width_maps(activation(spec, params), tol)
            return iterate(maps, depth, C_W, C_b, lambda_W, lambda_b, k1=k1, widths=widths)
    with budget.limits(max_work, max_memory):
        return _arch_finite_width(spec, depth, C_W, widths, k1, params, inputs, width, tol)


def _arch_finite_width(spec, depth, C_W, widths, k1, params, inputs, width, tol):
    net = _as_net(spec)
    if depth is not None or C_W is not None or widths is not None or k1 is not None or params:
        raise DeriveError("an architecture sets its own depth, variances and widths (give width for the "
                          "normalised columns)")
    if inputs is None and not any(layer.rule.structural for layer in net.distinct_layers()):
        from derive.finite.arch import arch_finite_width

        return arch_finite_width(net, width=width, tol=tol)
    from derive.finite.tensor import arch_finite_width_tensor

    if inputs is None:
        inputs = np.random.default_rng(0).standard_normal((1, 6, 4))
    return arch_finite_width_tensor(net, inputs, tol=tol)


@float64
def validate(spec, C_W: float | None = None, C_b: float = 0.0, depth: int | None = None, *,
             width: int | None = None, widths: Sequence[int] | None = None, samples: int | None = None,
             seed: int = 0, quantities=None, inputs=None, z_max: float = 5.0, max_work: float | None = None,
             max_memory: float | str | None = None, progress=True, **kwargs):
    """The derived statistics against sampled finite-width networks, with z-scores.

    For an activation, the dense network of ``depth`` layers (:func:`derive.validation.validate.validate`:
    quantities K, Theta, V, G1, Theta_var, dNTK_P, dNTK_Q; ``width`` or ``widths`` for a 1/n fit; more
    options in ``kwargs``). For an architecture (``derive.arch.serial(...)`` or a file): with ``width``
    the kernel of every block and the output NTK of a batch
    (:func:`derive.sampling.arch.validate_arch`); with ``widths`` the finite-width maps K, V, G1, Theta,
    Theta_var fitted in 1/n (:func:`derive.validation.arch.check_finite_width`). The sampling is estimated
    first and refused over ``max_work`` or ``max_memory`` (as for :func:`gram`). ``progress``: True
    shows the sampling on stderr (:mod:`derive.core.progress`), False nothing.
    """
    with budget.limits(max_work, max_memory):
        return _validate(spec, C_W, C_b, depth, width, widths, samples, seed, quantities, inputs, z_max,
                         {**kwargs, "progress": progress})


def _validate(spec, C_W, C_b, depth, width, widths, samples, seed, quantities, inputs, z_max, kwargs):
    if not _is_architecture(spec):
        from derive.validation.validate import validate as validate_dense

        if C_W is None or depth is None:
            raise DeriveError("validate of a dense network needs C_W and depth")
        return validate_dense(spec, C_W, C_b, depth, width=width, widths=widths,
                              samples=1000 if samples is None else samples, seed=seed,
                              quantities=("K", "Theta") if quantities is None else quantities, inputs=inputs,
                              z_max=z_max, **kwargs)
    net = _as_net(spec)
    if C_W is not None or depth is not None or C_b != 0.0:
        raise DeriveError("an architecture sets its own depth and variances")
    if (width is None) == (widths is None):
        raise DeriveError("give width (kernels of a batch) or widths (finite-width maps fitted in 1/n)")
    if widths is not None:
        from derive.validation.arch import check_finite_width

        return check_finite_width(net, widths, samples=4000 if samples is None else samples, seed=seed,
                                  z_max=z_max, quantities=("K", "V", "G1") if quantities is None else quantities,
                                  inputs=inputs, **kwargs)
    from derive.sampling.arch import validate_arch

    if inputs is None:
        needs_positions = any(layer.rule.structural for layer in net.distinct_layers())
        inputs = np.random.default_rng(0).standard_normal((3, 6, 4) if needs_positions else (4, 8))
    return validate_arch(net, inputs, width, samples=200 if samples is None else samples, seed=seed, z_max=z_max,
                         **kwargs)


def emit_code(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """Readable, standalone JAX source of the layer maps <sigma sigma>_K and <sigma' sigma'>_K."""
    e, d = numeric_kernel_expressions(kernel(spec, params))
    from derive.backends.codegen import to_source

    return to_source({"sigma_sigma": e, "dsigma_dsigma": d}, [S.K11, S.K12, S.K22])


@dataclass(frozen=True, repr=False)
class MonteCarloCheck:
    """Derived theory against sampled networks: per-layer NNGP and output NTK with z-scores.

    ``nngp_z`` is (L, N, N) for layers 1..L, ``ntk_z`` is (N, N); ``sampled`` is the
    :class:`derive.sampling.dense.MonteCarloResult` with means and standard errors.
    """

    theory_nngp: np.ndarray
    theory_ntk: np.ndarray
    sampled: object
    nngp_z: np.ndarray
    ntk_z: np.ndarray

    @property
    def max_abs_z(self) -> float:
        return float(max(np.max(np.abs(self.nngp_z)), np.max(np.abs(self.ntk_z))))

    def passed(self, z_max: float = 5.0) -> bool:
        return self.max_abs_z < z_max

    def __repr__(self) -> str:
        L, N = np.shape(self.nngp_z)[:2]
        return (f"MonteCarloCheck(max |z| = {self.max_abs_z:.2f} over the NNGP of {L} layers and the NTK, {N} inputs; "
                f"{self.sampled.n_networks} networks of width {self.sampled.widths[1]})")

    def _repr_markdown_(self) -> str:
        mc = self.sampled
        L, N = np.shape(self.nngp_z)[:2]
        rows = [["$K$", l + 1, a, b, self.theory_nngp[l, a, b], mc.nngp_mean[l, a, b], rounded(mc.nngp_stderr[l, a, b]),
                 rounded(self.nngp_z[l, a, b], 2)] for l in range(L) for a, b in upper_entries(N)]
        rows += [["$\\Theta$", L, a, b, self.theory_ntk[a, b], mc.ntk_mean[a, b], rounded(mc.ntk_stderr[a, b]),
                  rounded(self.ntk_z[a, b], 2)] for a, b in upper_entries(N)]
        verdict = "agrees" if self.passed() else "**disagrees**"
        return "\n".join([
            f"**Monte Carlo check**: {mc.n_networks} networks of width {mc.widths[1]} against the infinite-width "
            f"theory (every layer's NNGP, the output NTK); largest $\\lvert z\\rvert$ = {self.max_abs_z:.2f}: "
            f"{verdict} within 5 standard errors", "",
            markdown_table(["", "layer", "$a$", "$b$", "theory", "sampled mean", "±", "z"], rows)])


@float64
def monte_carlo_check(spec: ActivationLike, inputs, depth: int, C_W: float, C_b: float = 0.0,
                      lambda_W: float | None = None, lambda_b: float | None = None, *, width: int = 512,
                      n_networks: int = 200, seed: int = 0,
                      params: Mapping[str, str] | Sequence[str] | None = None, max_work: float | None = None,
                      max_memory: float | str | None = None, progress=True) -> MonteCarloCheck:
    """Compare the derived NNGP (every layer) and NTK (last layer) with sampled finite-width networks.

    Networks of hidden width ``width`` are drawn as the rules say (W ~ N(0, C_W/fan_in),
    b ~ N(0, C_b)); the mean over ``n_networks`` independent networks, with its standard error,
    is compared with the infinite-width theory. Finite width shifts the mean by O(depth/width)
    relative (PDLT ch. 4): choose ``width`` so that this bias is below the standard error, or
    compare with the 1/n-corrected theory. ``max_work``, ``max_memory`` as for :func:`gram`;
    ``progress`` (True: on stderr) as for :func:`sample`.
    """
    with budget.limits(max_work, max_memory):
        return _monte_carlo_check(spec, inputs, depth, C_W, C_b, lambda_W, lambda_b, width, n_networks, seed,
                                  params, progress)


def _monte_carlo_check(spec, inputs, depth, C_W, C_b, lambda_W, lambda_b, width, n_networks, seed, params,
                       progress):
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x = check_inputs(inputs)
    d = kernel(spec, params)
    e, de = numeric_kernel_expressions(d)
    from derive.backends.codegen import jax_activation
    from derive.kernels.gram import gram_profile
    from derive.sampling.dense import sample_kernels

    k_stack, t_stack = gram_profile(e, de, x, int(depth), C_W, C_b, lw, lb)
    sampled = sample_kernels(jax_activation(d.activation), x, int(depth), int(width), C_W, C_b, lw, lb,
                             n_networks=int(n_networks), seed=int(seed), progress=progress)
    theory_nngp, theory_ntk = np.asarray(k_stack), np.asarray(t_stack[-1])
    return MonteCarloCheck(theory_nngp, theory_ntk, sampled, sampled.nngp_z_scores(theory_nngp),
                           sampled.ntk_z_scores(theory_ntk))


@float64
def sample(spec, inputs, width: int, depth: int | None = None, C_W: float | None = None, C_b: float = 0.0,
           lambda_W: float | None = None, lambda_b: float | None = None, *, n_networks: int = 200, seed: int = 0,
           ntk: bool = True, params: Mapping[str, str] | Sequence[str] | None = None, progress=True,
           max_work: float | None = None, max_memory: float | str | None = None):
    """Sample ``n_networks`` finite-width networks and measure their empirical kernels.

    ``spec`` is an activation (name, expression or object: the dense network of ``depth`` layers of
    hidden width ``width`` with C_W, C_b, lambda_W, lambda_b, returning
    :class:`derive.sampling.dense.MonteCarloResult`: per-layer NNGP and output NTK means, standard
    errors) or an architecture (a description or a TOML file: every block's kernel and the output
    NTK at ``width`` channels, :class:`derive.sampling.arch.ArchMonteCarlo`). Parameters are drawn as
    the rules say; results depend only on ``seed``. ``progress``: True shows it on stderr
    (:mod:`derive.core.progress`), False nothing; a callable is called with the number of networks
    done. The work is estimated first and refused over ``max_work`` or ``max_memory`` (as :func:`gram`).
    """
    with budget.limits(max_work, max_memory):
        if _is_architecture(spec):
            if depth is not None or C_W is not None or C_b != 0.0:
                raise DeriveError("an architecture sets its own depth and variances")
            from derive.core.inputs import check_arch_inputs
            from derive.sampling.arch import sample_arch

            return sample_arch(_as_net(spec), check_arch_inputs(inputs), int(width), n_networks=int(n_networks),
                               seed=int(seed), ntk=ntk, progress=progress)
        if depth is None or C_W is None:
            raise DeriveError("sampling a dense network needs depth and C_W")
        C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
        from derive.backends.codegen import jax_activation
        from derive.sampling.dense import sample_kernels

        act = activation(spec, params)
        return sample_kernels(jax_activation(act), check_inputs(inputs), int(depth), int(width), C_W, C_b, lw, lb,
                              n_networks=int(n_networks), seed=int(seed), ntk=ntk, progress=progress)


def check(spec: ActivationLike | None = None, quantity: str | None = None, claim: str | None = None, *,
          latex: str | None = None, file: str | None = None, definitions=None,
          params: Mapping[str, str] | Sequence[str] | None = None, empirical: bool = False, seed: int = 0,
          time_budget: float = 10.0, rule_dirs: Sequence[str] = ()):
    """Check a hand derivation against the engine, high-precision numerics and (optionally) sampling.

    A claim is an expression for ``quantity`` (``expectation``, ``recursion``, ``chi_perp``, ``V``,
    ... see :data:`derive.claims.quantities.QUANTITIES`) in SymPy syntax (``claim``) or LaTeX (``latex``), with
    helper ``definitions`` such as ``["theta = \\arccos(\\rho)"]``; or a TOML claim ``file`` with
    several. Returns a :class:`derive.claims.report.CheckReport` (``.verdict`` is ``equal``, ``not-equal``
    or ``undecided``; ``.as_dict()``, ``.to_text()``), or a :class:`derive.claims.report.CheckSet` for a file.

    Example:
        >>> import derive
        >>> derive.check("relu", "single_input", "C_b + C_W*K/2").verdict
        'equal'
    """
    from derive.claims.check import check as check_claims

    return check_claims(spec, quantity, claim, latex=latex, file=file, definitions=definitions, params=params,
                        empirical=empirical, seed=seed, time_budget=time_budget, rule_dirs=rule_dirs)
