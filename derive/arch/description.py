"""Architecture descriptions: one object drives the derivation, the generated code and the sampler.

An architecture is a :class:`Serial` list of items, each a :class:`Layer` (an instance of a layer
rule from ``rules/layers``, see :mod:`derive.rules.layers`) or a :class:`Repeat` of a serial block.
Combinator layers (``residual``) carry a branch, itself a :class:`Serial`. Build one in Python::

    from derive import arch
    block = arch.residual(arch.layer_norm(), arch.dense(C_W=2), arch.activation("relu"),
                          arch.dense(C_W=1), xi=1, gamma=0.5)
    net = arch.serial(arch.dense(C_W=1), arch.repeat(10, block))

or read the equivalent declarative TOML file with :func:`load_arch` (``--arch FILE``)::

    name = "residual MLP"
    [[layers]]
    type = "dense"
    C_W = 1
    [[layers]]
    type = "repeat"
    times = 10
      [[layers.body]]
      type = "residual"
      xi = 1
      gamma = 0.5
        [[layers.body.branch]]
        type = "layernorm"
        [[layers.body.branch]]
        type = "dense"
        C_W = 2
        [[layers.body.branch]]
        type = "activation"
        activation = "relu"
        [[layers.body.branch]]
        type = "dense"

Numbers in a file may be written as text (``"2/5"``, ``"pi/4"``); they go through the safe parser
and must evaluate to a number. Every object here is immutable and hashable, so a description can be
a static argument of a jitted function, and the theory (:mod:`derive.kernels.arch`) and the sampler
(:mod:`derive.sampling.arch`) read the same one: they cannot describe different networks.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import sympy as sp
import tomllib

from derive.core.display import exact_fraction
from derive.core.errors import DeriveError, RuleError
from derive.core.parse import parse_expression
from derive.rules.layers import LayerRule, find_layer_rule

#: Keys of a layer table in a file that are not parameters or options of its rule.
_COMMON_KEYS = {"type", "width", "label", "activation", "params", "branch", "times", "body"}
#: Largest repetition count accepted (depth 10^4 is supported by the scan over repetitions).
MAX_REPEAT = 100_000
#: Largest architecture file read, and most layer tables in one (deep networks use ``repeat``).
MAX_FILE_BYTES = 1 << 20
MAX_FILE_LAYERS = 1000
#: Most layers :func:`as_dense_network` expands one by one (deeper plain networks are runs of a repeat).
_MAX_EXPANDED = 2 * MAX_REPEAT + 1


#: Attention mechanisms: how the attention weights follow from the logits (derive.kernels.attention).
MECHANISMS = ("softmax", "identity")


def check_points(points) -> int:
    """The number of quasi-Monte Carlo points of Gaussian-logit attention: a power of two of at least 2^8."""
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 256 or points & (points - 1):
        raise DeriveError(f"points must be a power of two of at least 256, got {points!r}")
    return int(points)


def _number(value, where: str) -> float:
    if isinstance(value, bool):
        raise DeriveError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        expr = parse_expression(value, {}, where=where)
        if not expr.is_number or not expr.is_real:
            raise DeriveError(f"{where}: '{value}' is not a real number")
        out = float(expr)
    else:
        raise DeriveError(f"{where}: expected a number, got {type(value).__name__}")
    if out != out or out in (float("inf"), float("-inf")):
        raise DeriveError(f"{where}: {value!r} is not finite")
    return out


def _int_tuple(value, where: str) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DeriveError(f"{where}: expected positive integers, got {value!r}")
        out.append(int(v))
    if not out:
        raise DeriveError(f"{where}: expected at least one entry")
    return tuple(out)


@dataclass(frozen=True)
class Layer:
    """One layer: a rule name, its parameter values and options, and what the rule needs besides.

    ``params`` and ``options`` are sorted (name, value) pairs; ``activation`` is the activation's
    name or expression with its parameters (activation layers); ``branch`` the branch of a
    combinator; ``width`` the output channels in sampled networks (weighted layers; default: the
    sampler's width).
    """

    type: str
    params: tuple[tuple[str, float], ...] = ()
    options: tuple[tuple[str, object], ...] = ()
    activation: str | None = None
    activation_params: tuple[tuple[str, str], ...] = ()
    branch: "Serial | None" = None
    width: int | None = None
    label: str = ""

    @property
    def rule(self) -> LayerRule:
        return find_layer_rule(self.type)

    def option(self, name: str):
        return dict(self.options)[name]

    def values(self) -> dict[sp.Symbol, sp.Expr]:
        """Every parameter of the rule: given values, else defaults."""
        return dict(_layer_values(self))

    def value(self, name: str) -> float:
        for symbol, v in self.values().items():
            if symbol.name == name:
                return float(v)
        raise KeyError(name)

    def resolved_activation(self):
        from derive.rules.activations import resolve

        return resolve(self.activation, dict(self.activation_params) or None)

    def describe(self) -> str:
        bits = [f"{k}={_shown(v)}" for k, v in self.params]
        bits += [f"{k}={v}" for k, v in self.options]
        if self.activation is not None:
            bits.insert(0, self.activation + "".join(f",{k}={v}" for k, v in self.activation_params))
        if self.width is not None:
            bits.append(f"width={self.width}")
        return f"{self.type}({', '.join(bits)})"


def _shown(v: float) -> str:
    """A parameter as written back: a small rational exactly (1/3), else every digit of the float."""
    q = exact_fraction(v)
    return repr(float(v)) if q is None else str(q)


@lru_cache(maxsize=None)
def _layer_values(layer: Layer) -> tuple:
    return tuple(layer.rule.defaults(dict(layer.params)).items())


@dataclass(frozen=True)
class Repeat:
    """``times`` copies of ``body`` in series (each copy with fresh weights)."""

    times: int
    body: "Serial"
    label: str = ""

    def describe(self) -> str:
        return f"repeat({self.times}, {self.body.describe()})"


Item = Union[Layer, Repeat]


@dataclass(frozen=True)
class Serial:
    """Layers and repeats applied in order."""

    items: tuple[Item, ...] = ()
    name: str = ""

    def describe(self) -> str:
        return "[" + ", ".join(item.describe() for item in self.items) + "]"

    def flat_layers(self):
        """Every layer in order, repeats and branches included (with repetition)."""
        for item in self.items:
            if isinstance(item, Repeat):
                for _ in range(item.times):
                    yield from item.body.flat_layers()
            else:
                if item.branch is not None:
                    yield from item.branch.flat_layers()
                yield item

    def layer_counts(self) -> dict:
        """{layer: how many times it runs}, repeats and branches included, counted without expanding them
        (nested repeats multiply), so that the size of a network is known before anything walks it."""
        counts: dict = {}

        def add(serial: "Serial", times: int) -> None:
            for item in serial.items:
                if isinstance(item, Repeat):
                    add(item.body, times * item.times)
                    continue
                if item.branch is not None:
                    add(item.branch, times)
                counts[item] = counts.get(item, 0) + times

        add(self, 1)
        return counts

    def distinct_layers(self):
        """Every layer once (repeats not expanded)."""
        for item in self.items:
            if isinstance(item, Repeat):
                yield from item.body.distinct_layers()
            else:
                if item.branch is not None:
                    yield from item.branch.distinct_layers()
                yield item

    def top_level(self) -> list[tuple[str, Item]]:
        """(label, item) for every recorded output: each top-level layer and each repetition."""
        out = []
        for i, item in enumerate(self.items):
            if isinstance(item, Repeat):
                name = item.label or f"repeat{i + 1}"
                out.extend((f"{name}[{k + 1}]", item) for k in range(item.times))
            else:
                out.append((item.label or f"{i + 1}:{item.type}", item))
        return out


# ------------------------------------------------------------------------------------------------
# Building and checking


def _ends_with_fresh_weights(branch: Serial) -> bool:
    if not branch.items:
        return False
    last = branch.items[-1]
    if isinstance(last, Repeat):
        return _ends_with_fresh_weights(last.body)
    if last.rule.combinator == "branch":
        return False
    return last.rule.fresh_weights


def layer(type: str, *branch: Item, width: int | None = None, label: str = "", activation: str | None = None,
          activation_params: dict | None = None, **values) -> Layer:
    """A layer of any rule type; keyword arguments are its parameters (numbers) and options.

    Raises:
        DeriveError: unknown type, parameter or option; a value of the wrong kind; an activation
            layer without an activation; a residual branch that does not end in a layer with fresh
            weights (its output would be correlated with the skip path, which the rule ignores).
    """
    rule = find_layer_rule(type)
    where = f"layer '{rule.name}'"
    params, options = {}, {}
    for key, value in values.items():
        if value is None:
            continue
        if key in rule.param_names:
            params[key] = _number(value, f"{where}: {key}")
            if params[key] < 0 and key.startswith(("C_", "lambda_")):
                raise DeriveError(f"{where}: {key} is a variance (or a learning-rate factor) and must be "
                                  f">= 0, got {value!r}")
        elif key in rule.option_names:
            options[key] = value
        else:
            allowed = rule.param_names + rule.option_names
            raise DeriveError(f"{where}: unknown parameter '{key}'"
                              + (f" (allowed: {', '.join(allowed)})" if allowed else " (it takes none)"))
    # every parameter explicit (defaults resolved), so equal networks are equal descriptions
    params = {symbol.name: float(value) for symbol, value in rule.defaults(params).items()}
    for name, default, _ in rule.options:
        options.setdefault(name, default)
    options = _check_options(rule, options, where)
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise DeriveError(f"{where}: width must be a positive integer, got {width!r}")
    if rule.name == "activation":
        if not activation:
            raise DeriveError(f"{where}: needs an activation (a rule name such as 'relu', or an expression in z)")
    elif activation is not None:
        raise DeriveError(f"{where}: only activation layers take an activation")
    act_params = tuple(sorted((str(k), str(v)) for k, v in (activation_params or {}).items()))
    branch_serial = None
    if rule.combinator == "branch":
        branch_serial = serial(*branch)
        if not _ends_with_fresh_weights(branch_serial):
            raise DeriveError(f"{where}: the branch must end in a layer with fresh weights (dense, conv, "
                              "attention), so that its output is uncorrelated with the skip path")
    elif branch:
        raise DeriveError(f"{where}: only combinators (residual) take a branch")
    out = Layer(rule.name, tuple(sorted(params.items())), tuple(sorted(options.items())), activation,
                act_params, branch_serial, width, label)
    if rule.name == "activation":
        try:
            out.resolved_activation()
        except DeriveError as exc:
            raise DeriveError(f"{where}: {exc}") from None
    return out


def _check_options(rule: LayerRule, options: dict, where: str) -> dict:
    out = {}
    for name, value in options.items():
        if name in ("filter", "stride", "window"):
            out[name] = _int_tuple(value, f"{where}: {name}")
        elif name == "padding":
            if not isinstance(value, str) or value.upper() not in ("SAME", "VALID"):
                raise DeriveError(f"{where}: padding must be 'SAME' or 'VALID', got {value!r}")
            out[name] = value.upper()
        elif name == "heads":
            out[name] = _int_tuple(value, f"{where}: heads")[0]
        elif name == "mechanism":
            if not isinstance(value, str) or value.lower() not in MECHANISMS:
                raise DeriveError(f"{where}: mechanism must be one of {', '.join(MECHANISMS)}, got {value!r}")
            out[name] = value.lower()
        elif name == "points":
            try:
                out[name] = check_points(value)
            except DeriveError as exc:
                raise DeriveError(f"{where}: {exc}") from None
        elif isinstance(value, (list, tuple)):
            out[name] = tuple(value)
        else:
            out[name] = value
    for a, b in (("filter", "stride"), ("window", "stride")):
        if a in out and b in out and len(out[a]) != len(out[b]):
            if len(out[b]) == 1:
                out[b] = out[b] * len(out[a])
            elif len(out[a]) == 1:
                out[a] = out[a] * len(out[b])
            else:
                raise DeriveError(f"{where}: {a} and {b} need the same number of spatial axes")
    return out


def serial(*items: Item | Serial, name: str = "") -> Serial:
    """Items in order; nested :class:`Serial` are spliced in."""
    flat: list[Item] = []
    for item in items:
        if isinstance(item, Serial):
            flat.extend(item.items)
        elif isinstance(item, (Layer, Repeat)):
            flat.append(item)
        else:
            raise DeriveError(f"not a layer: {item!r}")
    return Serial(tuple(flat), name)


def repeat(times: int, *body: Item | Serial, label: str = "") -> Repeat:
    """``times`` copies of the block ``body`` (fresh weights in each)."""
    if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= MAX_REPEAT:
        raise DeriveError(f"repeat: times must be an integer in 1..{MAX_REPEAT}, got {times!r}")
    block = serial(*body)
    if not block.items:
        raise DeriveError("repeat: the body is empty")
    return Repeat(times, block, label)


def dense(C_W=1.0, C_b=0.0, lambda_W=None, lambda_b=None, *, width=None, label="") -> Layer:
    """Dense layer, W ~ N(0, C_W / fan_in), b ~ N(0, C_b) (rules/layers/dense.toml)."""
    return layer("dense", C_W=C_W, C_b=C_b, lambda_W=lambda_W, lambda_b=lambda_b, width=width, label=label)


def activation(name: str, label: str = "", **params) -> Layer:
    """Elementwise activation: a rule name (``relu``, ``tanh``, ...) or an expression in z."""
    return layer("activation", activation=name, activation_params=params, label=label)


def layer_norm(eps=None, label: str = "") -> Layer:
    """LayerNorm over channels (rules/layers/layernorm.toml)."""
    return layer("layernorm", eps=eps, label=label)


def residual(*branch: Item | Serial, xi=1.0, gamma=1.0, label: str = "") -> Layer:
    """xi * input + gamma * branch(input) (rules/layers/residual.toml)."""
    return layer("residual", *branch, xi=xi, gamma=gamma, label=label)


def conv(filter=(3,), stride=(1,), padding="SAME", C_W=1.0, C_b=0.0, lambda_W=None, lambda_b=None, *,
         width=None, label="") -> Layer:
    """Convolution over the spatial axes (rules/layers/conv.toml)."""
    return layer("conv", filter=filter, stride=stride, padding=padding, C_W=C_W, C_b=C_b,
                 lambda_W=lambda_W, lambda_b=lambda_b, width=width, label=label)


def avg_pool(window=(2,), stride=None, padding="VALID", label="") -> Layer:
    """Average pooling (rules/layers/avg_pool.toml); stride defaults to the window."""
    return layer("avg_pool", window=window, stride=window if stride is None else stride, padding=padding,
                 label=label)


def global_avg_pool(label: str = "") -> Layer:
    return layer("global_avg_pool", label=label)


def flatten(label: str = "") -> Layer:
    return layer("flatten", label=label)


def attention(heads=1, C_Q=1.0, C_K=1.0, C_V=1.0, C_O=1.0, C_b=0.0, *, width=None, label="", **lambdas
              ) -> Layer:
    """Self-attention (rules/layers/attention.toml); ``lambda_V``, ``lambda_O``, ``lambda_b`` optional."""
    return layer("attention", heads=heads, C_Q=C_Q, C_K=C_K, C_V=C_V, C_O=C_O, C_b=C_b, width=width,
                 label=label, **lambdas)


def dot_product_attention(heads=1, C_Q=1.0, C_K=1.0, C_V=1.0, C_O=1.0, C_b=0.0, *, mechanism="softmax",
                          points=None, width=None, label="", **lambdas) -> Layer:
    """Scaled dot-product self-attention, independent query and key weights and logits q.k / sqrt(n/H)
    (rules/layers/dot_product_attention.toml); ``lambda_Q``, ``lambda_K``, ``lambda_V``, ``lambda_O``,
    ``lambda_b`` optional."""
    return layer("dot_product_attention", heads=heads, C_Q=C_Q, C_K=C_K, C_V=C_V, C_O=C_O, C_b=C_b,
                 mechanism=mechanism, points=points, width=width, label=label, **lambdas)


def mlp(depth: int, activation_name, C_W: float, C_b: float = 0.0, **kw) -> Serial:
    """The dense network: ``depth`` dense layers with the activation between them (a rule name, an
    expression in z, or a resolved :class:`~derive.rules.activations.Activation`)."""
    return dense_network(activation_name, depth, C_W, C_b, kw.get("lambda_W"), kw.get("lambda_b"), kw.get("width"))


def activation_layer(spec, params=None) -> Layer:
    """An activation layer for a rule name or expression (with ``params``), or for a resolved
    :class:`~derive.rules.activations.Activation` (its given parameter values travel along)."""
    from derive.rules.activations import Activation

    if isinstance(spec, Activation):
        if params:
            raise DeriveError("give parameters with the activation's name, not with a resolved Activation")
        params = {symbol.name: str(value) for symbol, value in (spec.values or {}).items()}
        spec = spec.name
    elif params is not None and not isinstance(params, dict):
        items = [str(p).split("=", 1) for p in params]
        if any(len(kv) != 2 for kv in items):
            raise DeriveError(f"activation parameters are NAME=VALUE, got {list(params)}")
        params = {k.strip(): v.strip() for k, v in items}
    return layer("activation", activation=spec, activation_params=params or None)


def dense_network(activation_spec, depth: int, C_W, C_b=0.0, lambda_W=None, lambda_b=None, widths=None,
                  params=None) -> Serial:
    """``dense, (activation, dense) x (depth - 1)``: PDLT's dense network as an architecture.

    C_W, C_b, lambda_W, lambda_b and ``widths`` are numbers or per-layer sequences (entry l for dense
    layer l + 1); runs of identical layers become one :class:`Repeat`, so any depth stays a few items
    (built without per-layer lists when every setting is a number). The depth is not bounded by
    :data:`MAX_REPEAT` here: what is computed with the network is bounded by its work estimate
    (:mod:`derive.core.budget`)."""
    if isinstance(depth, bool) or int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    depth = int(depth)

    def sequence(value) -> bool:
        return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1

    if not any(sequence(v) for v in (C_W, C_b, lambda_W, lambda_b, widths)):
        first = dense(C_W, C_b, lambda_W, lambda_b, width=None if widths is None else int(widths))
        body = serial(activation_layer(activation_spec, params), first)
        return serial(first, *([Repeat(depth - 1, body)] if depth > 1 else []))

    def per_layer(value, name):
        if value is None:
            return [None] * depth
        if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1:
            values = list(value)
            if len(values) != depth:
                raise DeriveError(f"{name} has {len(values)} entries for {depth} layers")
            return values
        return [value] * depth

    cw, cb = per_layer(C_W, "C_W"), per_layer(C_b, "C_b")
    lw, lb = per_layer(lambda_W, "lambda_W"), per_layer(lambda_b, "lambda_b")
    ns = [None if w is None else int(w) for w in per_layer(widths, "widths")]
    settings = [(cw[i], cb[i], lw[i], lb[i], ns[i]) for i in range(depth)]
    act = activation_layer(activation_spec, params)
    items: list[Item] = [dense(*settings[0][:4], width=settings[0][4])]
    k = 1
    while k < depth:
        run = 1
        while k + run < depth and settings[k + run] == settings[k]:
            run += 1
        items.append(Repeat(run, serial(act, dense(*settings[k][:4], width=settings[k][4]))))
        k += run
    return serial(*items)


def _gaussian_after(net: Serial, gaussian: bool, where: str, seen: dict | None = None) -> bool:
    """Whether ``net``'s output is Gaussian given its input is (``gaussian``); refuses a layer whose rule
    needs Gaussian input where it gets none. ``seen`` remembers bodies already walked, so that nested
    repeats cost their description's size, not the layers they expand to."""
    seen = {} if seen is None else seen
    for i, item in enumerate(net.items, start=1):
        if isinstance(item, Repeat):
            for _ in range(2):  # the body's output law settles after two passes
                key = (item.body, gaussian)
                if key not in seen:
                    seen[key] = _gaussian_after(item.body, gaussian, f"{where}{i}.", seen)
                gaussian = seen[key]
            continue
        rule = item.rule
        if rule.requires == "gaussian" and not gaussian:
            source = "the raw inputs" if not where and i == 1 else "non-Gaussian features"
            raise DeriveError(
                f"layer {where}{i} ({item.type}): its rule assumes zero-mean Gaussian features at its input "
                f"(the output of a dense, conv or attention layer, or sums and normalisations of them), "
                f"but it receives {source}; insert a dense layer, or note that "
                f"{'LayerNorm' if item.type == 'layernorm' else 'this'} of such features is not derivable yet")
        if item.branch is not None:
            _gaussian_after(item.branch, gaussian, f"{where}{i}.", seen)
        if rule.output == "gaussian":
            gaussian = True
        elif rule.output == "non-gaussian":
            gaussian = False
    return gaussian


@dataclass(frozen=True)
class DenseNetwork:
    """An architecture that is a plain dense network: dense, then (activation, dense) repeated, one
    activation throughout; per-layer hyperparameters as runs of equal layers (``runs``: ((C_W, C_b,
    lambda_W, lambda_b), number of dense layers) in order), so any depth stays small."""

    activation: str
    activation_params: tuple[tuple[str, str], ...]
    depth: int
    runs: tuple[tuple[tuple[float, float, float, float], int], ...]

    _NAMES = ("C_W", "C_b", "lambda_W", "lambda_b")

    def values(self, name: str) -> list[float]:
        """The per-layer values of one hyperparameter (index 0 = layer 1)."""
        k = self._NAMES.index(name)
        return [v for values, times in self.runs for v in [values[k]] * times]

    def hyperparameter(self, name: str):
        """A number when uniform over the layers (closed forms in depth apply), else the list."""
        k = self._NAMES.index(name)
        distinct = {values[k] for values, _ in self.runs}
        return distinct.pop() if len(distinct) == 1 else self.values(name)


def _segments(net: Serial) -> list[tuple[tuple[Layer, ...], int]]:
    """The flat layer sequence of ``net`` as (block of layers, repetitions) segments, repeats not expanded
    (a nested repeat's body is expanded once inside its segment)."""
    out: list[tuple[tuple[Layer, ...], int]] = []
    for item in net.items:
        if isinstance(item, Repeat):
            out.append((tuple(item.body.flat_layers()), item.times))
        elif item.branch is not None:
            out.append((tuple(item.branch.flat_layers()) + (item,), 1))
        else:
            out.append(((item,), 1))
    return out


def as_dense_network(net: Serial) -> DenseNetwork | str:
    """The dense-network form of ``net`` (finite-width rules exist for it), or why it has none."""
    size = sum(net.layer_counts().values())
    nested = any(isinstance(j, Repeat) or j.branch is not None
                 for i in net.items for j in (i.body.items if isinstance(i, Repeat) else i.branch.items
                                              if i.branch is not None else ()))
    if nested and size > _MAX_EXPANDED:
        return (f"{size} layers written with nested repeats or branches are evaluated layer by layer (a "
                "dense network of that depth is one repeat of activation and dense)")
    segments = _segments(net)
    for block, _ in segments:
        for layer in block:
            if layer.type not in ("dense", "activation"):
                return (f"layer type '{layer.type}' has no finite-width rules yet (V, G1 and the NTK "
                        "fluctuations are derived for dense networks: dense, then activation and dense "
                        "repeated)")
    pattern = "finite-width rules need the pattern dense, (activation, dense) repeated"
    position = 0  # index of the next layer in the flat sequence; dense at even positions
    for block, times in segments:
        if not block or (times > 1 and len(block) % 2):
            return pattern
        expected = ("activation" if (position + i) % 2 else "dense" for i in range(len(block)))
        if any(item.type != kind for item, kind in zip(block, expected)):
            return pattern
        position += len(block) * times
    if position == 0 or position % 2 == 0:
        return pattern
    acts = {(item.activation, item.activation_params) for block, _ in segments for item in block
            if item.type == "activation"}
    if len(acts) > 1:
        return "finite-width rules need one activation throughout"
    name, params = acts.pop() if acts else ("linear", ())
    if any(times > 1 and sum(item.type == "dense" for item in block) > 1 for block, times in segments):
        if size > _MAX_EXPANDED:
            return (f"{size} layers whose repeated blocks hold several dense layers are evaluated layer by "
                    "layer (a dense network of that depth is one repeat of activation and dense)")
        return _expanded_dense(name, params, segments)
    runs: list[list] = []
    for block, times in segments:
        for layer in block:
            if layer.type == "dense":  # one per repeated block: it runs ``times`` times in a row
                values = tuple(layer.value(k) for k in DenseNetwork._NAMES)
                if runs and runs[-1][0] == values:
                    runs[-1][1] += times
                else:
                    runs.append([values, times])
    return DenseNetwork(name, params, (position + 1) // 2, tuple((v, n) for v, n in runs))


def _expanded_dense(name, params, segments) -> DenseNetwork:
    """The runs of a dense network whose repeated blocks hold several dense layers (layer by layer)."""
    runs: list[list] = []
    for block, times in segments:
        for _ in range(times):
            for layer in block:
                if layer.type == "dense":
                    values = tuple(layer.value(k) for k in DenseNetwork._NAMES)
                    if runs and runs[-1][0] == values:
                        runs[-1][1] += 1
                    else:
                        runs.append([values, 1])
    return DenseNetwork(name, params, sum(n for _, n in runs), tuple((v, n) for v, n in runs))


def check_derivable(net: Serial) -> Serial:
    """Refuse descriptions whose layers' rules do not apply to what they receive.

    Activations and LayerNorm are derived for zero-mean Gaussian inputs (PDLT ch. 4: the
    preactivations of a wide network are Gaussian; the channel mean of sigma(z) is not zero, so
    LayerNorm after an activation, or an activation of the raw inputs, needs more than these rules).
    """
    _gaussian_after(net, False, "")
    return net


# ------------------------------------------------------------------------------------------------
# Files


def _items_from_tables(tables, where: str) -> list[Item]:
    if not isinstance(tables, list):
        raise DeriveError(f"{where}: expected an array of layer tables ([[...]])")
    out = []
    for i, table in enumerate(tables):
        here = f"{where}[{i + 1}]"
        if not isinstance(table, dict) or "type" not in table:
            raise DeriveError(f"{here}: each layer needs a 'type'")
        kind = table["type"]
        if kind == "repeat":
            extra = set(table) - {"type", "times", "body", "label"}
            if extra:
                raise DeriveError(f"{here}: unknown key(s) for repeat: {', '.join(sorted(extra))}")
            times = table.get("times")
            body = _items_from_tables(table.get("body", []), f"{here}.body")
            out.append(repeat(times, *body, label=str(table.get("label", ""))))
            continue
        kwargs = {k: v for k, v in table.items() if k not in _COMMON_KEYS}
        branch = _items_from_tables(table["branch"], f"{here}.branch") if "branch" in table else []
        params = table.get("params")
        if params is not None and not isinstance(params, dict):
            raise DeriveError(f"{here}: 'params' must be a table of activation parameters")
        try:
            out.append(layer(kind, *branch, width=table.get("width"), label=str(table.get("label", "")),
                             activation=table.get("activation"), activation_params=params, **kwargs))
        except (DeriveError, RuleError) as exc:
            raise DeriveError(f"{here}: {exc}") from None
    return out


def arch_from_dict(data: dict, where: str = "architecture") -> Serial:
    """An architecture from the parsed TOML table (see module docstring)."""
    extra = set(data) - {"name", "layers", "description"}
    if extra:
        raise DeriveError(f"{where}: unknown top-level key(s): {', '.join(sorted(extra))}")
    if "layers" not in data:
        raise DeriveError(f"{where}: no [[layers]]")
    items = _items_from_tables(data["layers"], f"{where}: layers")
    if not items:
        raise DeriveError(f"{where}: no layers")
    try:
        return check_derivable(serial(*items, name=str(data.get("name", ""))))
    except DeriveError as exc:
        raise DeriveError(f"{where}: {exc}") from None


def load_arch(path: str | Path) -> Serial:
    """Read an architecture file (TOML, module docstring); errors name the file and the layer."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise DeriveError(f"{path.name}: an architecture file of {path.stat().st_size} bytes, more than "
                              f"the {MAX_FILE_BYTES} read (a deep network repeats a block with "
                              'type = "repeat")')
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DeriveError(f"cannot read architecture file '{path}': {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeriveError(f"{path.name}: not a text (UTF-8) file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeriveError(f"{path.name}: not valid TOML ({exc})") from None
    except RecursionError:
        raise DeriveError(f"{path.name}: nested too deeply to read") from None
    tables = _count_tables(data.get("layers", []))
    if tables > MAX_FILE_LAYERS:
        raise DeriveError(f"{path.name}: {tables} layer tables, more than {MAX_FILE_LAYERS} (a deep network "
                          "repeats a block with type = \"repeat\")")
    return arch_from_dict(data, path.name)


def _count_tables(tables, depth: int = 0) -> int:
    """Layer tables in a file's ``layers``, bodies and branches included (nesting is bounded by the TOML
    parser)."""
    if not isinstance(tables, list):
        return 0
    return sum(1 + _count_tables(t.get("body", []), depth + 1) + _count_tables(t.get("branch", []), depth + 1)
               for t in tables if isinstance(t, dict))


__all__ = ["DenseNetwork", "Layer", "Repeat", "Serial", "activation", "activation_layer", "arch_from_dict",
           "as_dense_network", "attention", "avg_pool", "check_derivable", "conv", "dense", "dense_network",
           "dot_product_attention", "flatten", "global_avg_pool", "layer", "layer_norm", "load_arch", "mlp",
           "repeat", "residual", "serial"]
