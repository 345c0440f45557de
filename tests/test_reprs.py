"""Every result object displays well: a one-line ``repr`` and, for Jupyter, LaTeX or Markdown with the
formulas in LaTeX (balanced) and the numbers in tables, written in full.

Each object is built through the public API with small sizes (few samples, shallow networks)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import derive
from derive import arch
from derive.core.display import markdown_table, markdown_text, matrix_table, number

X = np.random.default_rng(0).standard_normal((3, 4))
TANH_BLOCKS = arch.serial(arch.dense(1.0), arch.repeat(
    2, arch.residual(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.0), xi=0.8, gamma=0.6)))
RELU_NET = arch.serial(arch.dense(1.0), arch.activation("relu"), arch.dense(2.0), name="relu_mlp")
CLAIMS = '''
activation = "leaky_relu"
params = { a = "0.2" }
[claims]
single_input = "C_b + C_W*K*(1 + a**2)/2"
chi_perp = "C_W*(1 + a**2)/3"
'''


def _check_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("claims") / "claims.toml"
    path.write_text(CLAIMS)
    return derive.check(file=path)


def _batch():
    from derive.finite.batch import iterate_batch

    return iterate_batch(derive.activation("tanh"), X, 3, 1.0, 0.0)


#: name -> how to build it (a callable of pytest's tmp_path_factory).
BUILDERS = {
    "KernelDerivation": lambda _: derive.kernel("tanh"),
    "KernelDerivation(closed form)": lambda _: derive.kernel("leaky_relu", {"a": "0.2"}),
    "CriticalityReport": lambda _: derive.criticality("tanh"),
    "CriticalityReport(scale-invariant)": lambda _: derive.criticality("relu"),
    "ArchCriticality": lambda _: derive.criticality(TANH_BLOCKS),
    "GramResult": lambda _: derive.gram("relu", X, 3, 2.0),
    "MonteCarloCheck": lambda _: derive.monte_carlo_check("relu", X, 2, 2.0, width=16, n_networks=20),
    "FiniteWidthProfile": lambda _: derive.finite_width("tanh", 5, 1.5, 0.1),
    "FiniteWidthProfile(widths)": lambda _: derive.finite_width("relu", 3, 2.0, widths=[64, 128, 32]),
    "ArchFiniteWidth": lambda _: derive.finite_width(TANH_BLOCKS, width=64),
    "TensorFiniteWidth": lambda _: derive.finite_width(RELU_NET, inputs=X[:2, :3]),
    "BatchProfile": lambda _: _batch(),
    "ValidationReport": lambda _: derive.validate("tanh", 1.0, 0.0, 2, widths=(8, 16), samples=20,
                                                  quantities=("K", "V")),
    "FiniteWidthCheck": lambda _: derive.validate(RELU_NET, widths=(8, 16), samples=20),
    "ArchValidation": lambda _: derive.validate(RELU_NET, width=16, samples=20),
    "CheckReport": lambda _: derive.check("tanh", "chi_perp", "C_W*(1-K)"),
    "CheckSet": _check_set,
}
#: objects reached through another one: name -> (builder's name, attribute)
PARTS = {"MonteCarloResult": ("MonteCarloCheck", "sampled"), "ArchMonteCarlo": ("ArchValidation", "mc"),
         "ArchKernels": ("ArchValidation", "theory")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name in PARTS:
            owner, attribute = PARTS[name]
            return getattr(get(owner), attribute)
        if name not in cache:
            cache[name] = BUILDERS[name](tmp_path_factory)
        return cache[name]

    return get


def _rich(obj) -> str:
    for method in ("_repr_latex_", "_repr_markdown_", "_repr_html_"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    raise AssertionError(f"{type(obj).__name__} has no rich display")


def _formulas(text: str) -> list[str]:
    """The LaTeX between $$...$$ and $...$."""
    display = re.findall(r"\$\$(.+?)\$\$", text, flags=re.S)
    rest = re.sub(r"\$\$(.+?)\$\$", " ", text, flags=re.S)
    return display + re.findall(r"\$(.+?)\$", rest, flags=re.S)


def _balanced(latex: str) -> bool:
    """Braces balance (a backslash escapes the next character: \\{, \\}, \\\\), and so do \\left/\\right
    and \\begin/\\end."""
    depth, k = 0, 0
    while k < len(latex):
        ch = latex[k]
        if ch == "\\":
            k += 2
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
        k += 1
    left, right = len(re.findall(r"\\left\b", latex)), len(re.findall(r"\\right\b", latex))
    return depth == 0 and left == right and latex.count(r"\begin{") == latex.count(r"\end{")


@pytest.mark.slow
@pytest.mark.parametrize("name", [*BUILDERS, *PARTS])
def test_short_repr_and_rich_display(built, name):
    obj = built(name)
    cls = type(obj).__name__
    assert cls == name.split("(")[0]
    text = repr(obj)
    assert text.startswith(cls + "(") and text.endswith(")"), text
    assert "\n" not in text and len(text) <= 120, text
    for dump in ("source", "array(", "rule=", "Activation(", "values={"):
        assert dump not in text, text
    rich = _rich(obj)
    formulas = _formulas(rich)
    assert formulas, rich
    for latex in formulas:
        assert _balanced(latex), latex
    if hasattr(obj, "_repr_markdown_"):
        assert re.search(r"^\|.*\|\n\|(---\|)+$", rich, flags=re.M), rich  # a table header
    else:
        assert rich.startswith("$$\\begin{aligned}") and rich.endswith("\\end{aligned}$$")


def test_numbers_are_written_in_full(built):
    g = built("GramResult")
    md = g._repr_markdown_()
    for value in (g.nngp[0, 2], g.ntk[1, 1]):
        assert repr(float(value)) in md
    fw = built("FiniteWidthProfile")
    assert repr(float(fw.values["V"][-1])) in fw._repr_markdown_()
    v = built("ValidationReport")
    assert repr(float(v.results[-1]["theory"])) in v._repr_markdown_()
    assert "…" not in md and "..." not in md


def test_kernel_latex_is_the_command_lines(built):
    d = built("KernelDerivation")
    res = subprocess.run([sys.executable, "-m", "cli", "kernel", "-a", "tanh", "-f", "latex"], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert d.to_latex() == res.stdout.rstrip("\n")
    # a quadrature node prints as the Gaussian integral, not as the SymPy function's name and arguments
    assert r"\mathbb{E}_{z \sim \mathcal{N}(0,\, K)}\left[\tanh^{2}{\left(z \right)}\right]" in d.to_latex()
    assert "GaussianExpectation" not in d._repr_latex_() and "quadrature orders 129, 193" in repr(d)


def test_long_tables_say_what_they_show():
    deep = derive.finite_width("relu", 60, 2.0, k1=1.0)
    md = deep._repr_markdown_()
    assert "(60 rows, showing the first 20 and the last 20)" in md
    assert f"| 60 | {number(deep.values['K'][-1])} |" in md and "| 21 |" not in md
    table = matrix_table(np.arange(144.0).reshape(12, 12) / 7)
    assert "(12 × 12, showing columns 0 to 7)" in table and number(143 / 7) not in table
    assert number(11 * 12 / 7) in table  # every row is shown, its first columns in full


def test_display_helpers():
    assert number(0.1 + 0.2) == "0.30000000000000004" and number(np.float32(0.1)) == "0.1"
    assert number(None) == "—" and number(3) == "3" and number(float("nan")) == "NaN"
    assert markdown_text("<sigma>_K a*b|c") == r"&lt;sigma>\_K a\*b\|c"
    table = markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]


def test_displays_of_symbolic_results_do_not_import_jax():
    script = ("import sys, derive\n"
              "for obj in (derive.kernel('relu'), derive.criticality('tanh')):\n"
              "    repr(obj); (getattr(obj, '_repr_latex_', None) or obj._repr_markdown_)()\n"
              "print('JAX' if 'jax' in sys.modules else 'NOJAX')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "NOJAX"
