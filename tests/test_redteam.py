"""Red team: every door of the ``derive`` command tried with hostile input.

Text doors (``--activation``, ``--param``, ``--claim``, ``--claim-latex``, ``--define``, ``--claim-file``,
``--rules DIR``, ``DERIVE_RULES_PATH``, ``--arch``) get injection attempts, oversized and deeply nested
input; file doors (``--inputs``, ``--input-kernel``, ``--arch``) get object-dtype, truncated,
wrong-shape, NaN, infinite and complex arrays; numeric options get negative, zero, NaN, infinite and
huge values. Each attempt must be refused cleanly: exit status 2, exactly one line ``error: ...`` on
stderr, no traceback, no warning, no canary file (an injection that ran would create it) and no
output file, complete or partial, where ``--out`` was given.

Most attempts run in this process through :func:`cli.main` (the command's entry point, with its
one-line error handling) inside :meth:`typer.testing.CliRunner.isolation`; a few run as real
subprocesses for the exit status and stderr a user sees, and for Ctrl-C during a run with ``--out``.

``python tests/test_redteam.py --count`` prints how many attempts were tried and how many were refused
cleanly (``-v`` also lists each one); ``pytest tests/test_redteam.py -s`` prints the same counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

CANARY = "CANARY"
TOUCH = f"__import__('os').system('touch {CANARY}')"
#: Injection attempts against expression parsers (each would create the canary file if it ran).
INJECTIONS = (
    TOUCH,
    f"open('{CANARY}', 'w')",
    f"exec(\"open('{CANARY}','w')\")",
    f"eval(\"open('{CANARY}','w')\")",
    f"sympify(\"open('{CANARY}','w')\")",
    "z.__class__.__bases__[0].__subclasses__()",
    "().__class__.__base__.__subclasses__()",
    f"(lambda: open('{CANARY}', 'w'))()",
    f"[open('{CANARY}', 'w') for _ in (1,)]",
    "getattr(z, '__class__')",
    f"z; import os; os.system('touch {CANARY}')",
    f"z\nimport os\nos.system('touch {CANARY}')",
    "globals()",
    "__builtins__",
    "f'{z}'",
    "z if z else 1",
    "z @ z",
    "z[0]",
    "z := 1",
    "Symbol('z')",
    "Function('f')(z)",
    "\x00z",
    "",
    "   ",
    "1e999999 * z",
)
#: Oversized and deeply nested input.
NESTED = "(" * 5000 + "z" + ")" * 5000
SIN_NESTED = "sin(" * 500 + "z" + ")" * 500
OVERSIZED = "z" + "+z" * 200_000
LONG_NAME = "z" * 100_000
HUGE_POWER = "z" + "**z" * 2000
SIZE_ATTACKS = (NESTED, SIN_NESTED, OVERSIZED, LONG_NAME, HUGE_POWER)

NUMERIC_BAD = ("-1", "nan", "inf", "-inf")


@dataclass
class Attempt:
    door: str
    args: list[str]
    env: dict = field(default_factory=dict)
    out: str | None = None  # an --out file that must not appear
    expect: str | None = None  # words the refusal must contain, where the reason matters

    @property
    def label(self) -> str:
        shown = " ".join(a if len(a) < 60 else a[:40] + f"...({len(a)} chars)" for a in self.args)
        env = " ".join(f"{k}=..." for k in self.env)
        return f"[{self.door}] {env + ' ' if env else ''}derive {shown!r}"


@dataclass
class Outcome:
    attempt: Attempt
    clean: bool
    why: str
    stderr: str


# ------------------------------------------------------------------------------------------------
# Hostile files


def _npy(folder: Path, name: str, array) -> str:
    path = folder / f"{name}.npy"
    np.save(path, array, allow_pickle=True)
    return str(path)


def make_files(folder: Path) -> dict[str, str]:
    """Hostile .npy arrays, TOML files and rule folders in ``folder``; returns name -> path."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((4, 8))
    files = {
        "object": _npy(folder, "object", np.array([good[0], "x", None], dtype=object)),
        "nan": _npy(folder, "nan", np.where(good > 1, np.nan, good)),
        "inf": _npy(folder, "inf", np.where(good > 1, np.inf, good)),
        "complex": _npy(folder, "complex", good + 1j),
        "strings": _npy(folder, "strings", np.array([["a", "b"], ["c", "d"]])),
        "one_d": _npy(folder, "one_d", good[0]),
        "three_d": _npy(folder, "three_d", rng.standard_normal((2, 3, 4, 5, 6))),
        "empty": _npy(folder, "empty", np.zeros((0, 8))),
        "no_features": _npy(folder, "no_features", np.zeros((4, 0))),
        "scalar": _npy(folder, "scalar", np.float64(1.0)),
        "huge_values": _npy(folder, "huge_values", good * 1e300),
        "kernel_not_square": _npy(folder, "kernel_not_square", good[:, :3]),
        "kernel_not_psd": _npy(folder, "kernel_not_psd", np.array([[1.0, 2.0], [2.0, 1.0]])),
        "kernel_asymmetric": _npy(folder, "kernel_asymmetric", np.array([[1.0, 0.5], [0.1, 1.0]])),
        "kernel_nan": _npy(folder, "kernel_nan", np.array([[1.0, np.nan], [np.nan, 1.0]])),
    }
    files["good"] = _npy(folder, "good", good)
    files["targets"] = _npy(folder, "targets", good[:, 0])
    whole = (folder / "nan.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(whole[: len(whole) // 2])
    files["truncated"] = str(folder / "truncated.npy")
    (folder / "header_only.npy").write_bytes(whole[:20])
    files["header_only"] = str(folder / "header_only.npy")
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (100000000000, 100000000000), }"
    header += b" " * (118 - len(header)) + b"\n"
    (folder / "lying_header.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00" + header + b"\x00" * 64)
    files["lying_header"] = str(folder / "lying_header.npy")
    (folder / "text.npy").write_text("not an array\n")
    files["text"] = str(folder / "text.npy")
    (folder / "a_folder.npy").mkdir()
    files["folder"] = str(folder / "a_folder.npy")
    files["missing"] = str(folder / "missing.npy")

    def toml(name: str, text: str) -> None:
        (folder / name).write_text(text)
        files[name] = str(folder / name)

    layer = '[[layers]]\ntype = "dense"\nC_W = 2\n'
    toml("arch_injection.toml", f'{layer}[[layers]]\ntype = "activation"\nactivation = "{TOUCH}"\n{layer}')
    toml("arch_unknown_layer.toml", '[[layers]]\ntype = "__import__"\n')
    toml("arch_no_layers.toml", 'name = "nothing"\n')
    toml("arch_not_toml.toml", "[[layers]\ntype = dense\n")
    toml("arch_negative.toml", '[[layers]]\ntype = "dense"\nC_W = -2\n')
    toml("arch_nan.toml", '[[layers]]\ntype = "dense"\nC_W = nan\n')
    toml("arch_inf.toml", '[[layers]]\ntype = "dense"\nC_W = inf\n')
    toml("arch_string_number.toml", f'[[layers]]\ntype = "dense"\nC_W = "{TOUCH}"\n')
    body = ('[[layers.body]]\ntype = "activation"\nactivation = "tanh"\n'
            '[[layers.body]]\ntype = "dense"\nC_W = 1\n')
    toml("arch_huge_repeat.toml", f'{layer}[[layers]]\ntype = "repeat"\ntimes = 1000000000000000000\n{body}')
    toml("arch_deep_repeat.toml", f'{layer}[[layers]]\ntype = "repeat"\ntimes = 100000\n{body * 25}')
    toml("arch_zero_repeat.toml", f'{layer}[[layers]]\ntype = "repeat"\ntimes = 0\n{body}')
    toml("arch_huge_width.toml", '[[layers]]\ntype = "dense"\nC_W = 2\nwidth = 1000000000000\n')
    nested = body.replace("[[layers.body", "[[layers")
    for _ in range(60):  # 2^60 layers, described in a few kilobytes
        nested = '[[layers]]\ntype = "repeat"\ntimes = 2\n' + nested.replace("[[layers", "[[layers.body")
    toml("arch_nested.toml", layer + nested)
    toml("arch_deep_toml.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    toml("arch_oversized.toml", layer * 200_000)
    (folder / "arch_binary.toml").write_bytes(bytes(range(256)) * 64)
    files["arch_binary.toml"] = str(folder / "arch_binary.toml")

    toml("claims_injection.toml", f'activation = "relu"\n[claims]\nexpectation = "{TOUCH}"\n')
    toml("claims_define_injection.toml", f'activation = "relu"\n[claims]\nexpectation = "t"\n'
                                         f'[definitions]\nt = "{TOUCH}"\n')
    toml("claims_activation_injection.toml", f'activation = "{TOUCH}"\n[claims]\nexpectation = "K12"\n')
    toml("claims_latex_injection.toml", 'activation = "relu"\n[claims.latex]\n'
                                        'expectation = "\\\\immediate\\\\write18{touch CANARY}"\n')
    toml("claims_unknown_quantity.toml", 'activation = "relu"\n[claims]\n__class__ = "K12"\n')
    toml("claims_empty.toml", 'activation = "relu"\n')
    toml("claims_not_toml.toml", "activation = \n")
    toml("claims_nested.toml", f'activation = "relu"\n[claims]\nexpectation = "{NESTED}"\n')
    toml("claims_oversized.toml", f'activation = "relu"\n[claims]\nexpectation = "{OVERSIZED}"\n')
    toml("claims_deep_toml.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n")

    def rules(name: str, activation_file: str | None, text: str = "") -> None:
        root = folder / name
        (root / "activations").mkdir(parents=True)
        if activation_file is not None:
            (root / "activations" / activation_file).write_text(text)
        files[name] = str(root)

    rules("rules_injection", "evil.toml", f'name = "evil"\nexpression = "{TOUCH}"\n')
    rules("rules_param_injection", "evil.toml", f'name = "evil"\nexpression = "a*z"\n[params.a]\n'
                                                f'default = "{TOUCH}"\n')
    rules("rules_not_toml", "evil.toml", "name = \n")
    rules("rules_no_expression", "evil.toml", 'name = "evil"\n')
    rules("rules_nested", "evil.toml", f'name = "evil"\nexpression = "{NESTED}"\n')
    rules("rules_oversized", "evil.toml", f'name = "evil"\nexpression = "{OVERSIZED}"\n')
    rules("rules_shadow_builtin", "evil.toml", f'name = "evil"\naliases = ["__import__"]\n'
                                               f'expression = "{TOUCH}"\n')
    return files


# ------------------------------------------------------------------------------------------------
# Attempts


def attempts(files: dict[str, str], folder: Path) -> list[Attempt]:
    out: list[Attempt] = []
    add = out.append
    npz, png = str(folder / "out.npz"), str(folder / "out.png")

    # --activation
    for text in INJECTIONS + SIZE_ATTACKS:
        add(Attempt("--activation", ["kernel", "--activation", text, "--format", "json"]))
    for text in (TOUCH, NESTED):
        add(Attempt("--activation", ["gram", "-a", text, "--depth", "2", "--cw", "2", "--out", npz], out=npz))
        add(Attempt("--activation", ["criticality", "-a", text]))
        add(Attempt("--activation", ["codegen", "-a", text, "--out", str(folder / "out.py")],
                    out=str(folder / "out.py")))
    # activations whose Gaussian expectations do not exist or overflow float64
    for text in ("exp(exp(exp(z)))", "exp(exp(z))", "exp(z**2)", "1/z", "log(Abs(z))"):
        add(Attempt("--activation", ["kernel", "--activation", text]))
    for text in ("exp(50*z)", "exp(exp(z))"):
        add(Attempt("--activation", ["gram", "-a", text, "--depth", "3", "--cw", "2", "--out", npz], out=npz))

    # --param
    for value in INJECTIONS[:12] + SIZE_ATTACKS[:3] + ("nan", "inf", "1e999", "9" * 5000, "z"):
        add(Attempt("--param", ["kernel", "-a", "leaky_relu", "--param", f"a={value}"]))
    for bad in ("a", "=1", "a=1=2", "__class__=1", "b=1", "a=1 a=2"):
        add(Attempt("--param", ["kernel", "-a", "leaky_relu", "--param", bad]))

    # --claim, --claim-latex, --define
    check = ["check", "-a", "relu", "-q", "expectation"]
    for text in INJECTIONS + SIZE_ATTACKS:
        add(Attempt("--claim", check + ["--claim", text]))
    latex = (r"\immediate\write18{touch CANARY}", r"\input{/etc/passwd}", r"\def\x{1}\x",
             r"\frac{", r"\frac{K_{12}}{", r"\csname", "\\" * 10_000, r"\frac{" * 2000 + "1" + "}{2}" * 2000,
             r"\sqrt{" * 3000 + "K_{12}" + "}" * 3000, r"\operatorname{__import__}(x)", TOUCH, "",
             r"\mathrm{open}('CANARY')")
    for text in latex:
        add(Attempt("--claim-latex", check + ["--claim-latex", text]))
    for text in (f"t={TOUCH}", "=1", "t", "t=t", "K11=1", "__class__=K12", f"t={NESTED}", f"t={OVERSIZED}",
                 "t=(", "\\theta=\\arccos("):
        add(Attempt("--define", check + ["--claim", "t", "--define", text]))
    add(Attempt("--define", check + ["--claim", "t", "--define", "t=u", "--define", "u=t"]))

    # --claim-file
    claim_files = ("claims_injection.toml", "claims_define_injection.toml",
                   "claims_activation_injection.toml",
                   "claims_latex_injection.toml", "claims_unknown_quantity.toml", "claims_empty.toml",
                   "claims_not_toml.toml", "claims_nested.toml", "claims_oversized.toml",
                   "claims_deep_toml.toml", "nan", "folder", "missing")
    for name in claim_files:
        add(Attempt("--claim-file", ["check", "--claim-file", files[name]]))

    # --rules DIR and DERIVE_RULES_PATH
    rule_dirs = ("rules_injection", "rules_param_injection", "rules_not_toml", "rules_no_expression",
                 "rules_nested", "rules_oversized", "rules_shadow_builtin")
    for name in rule_dirs:
        add(Attempt("--rules", ["kernel", "-a", "evil", "--rules", files[name]]))
        add(Attempt("DERIVE_RULES_PATH", ["kernel", "-a", "evil"], env={"DERIVE_RULES_PATH": files[name]}))
    for bad in (files["missing"], files["nan"], "/dev/null", "\x00"):
        add(Attempt("--rules", ["kernel", "-a", "relu", "--rules", bad]))
    add(Attempt("--rules", ["kernel", "-a", TOUCH, "--rules", files["rules_shadow_builtin"]]))
    add(Attempt("DERIVE_RULES_PATH", ["kernel", "-a", TOUCH],
                env={"DERIVE_RULES_PATH": files["rules_shadow_builtin"]}))

    # --arch (a text door and a file door)
    arch_files = ("arch_injection.toml", "arch_unknown_layer.toml", "arch_no_layers.toml",
                  "arch_not_toml.toml", "arch_negative.toml", "arch_nan.toml", "arch_inf.toml",
                  "arch_string_number.toml", "arch_huge_repeat.toml", "arch_deep_repeat.toml",
                  "arch_zero_repeat.toml", "arch_nested.toml", "arch_deep_toml.toml",
                  "arch_oversized.toml", "arch_binary.toml", "nan", "folder", "missing")
    reasons = {"arch_negative.toml": "is a variance", "arch_huge_repeat.toml": "times must be",
               "arch_deep_repeat.toml": "operations", "arch_nested.toml": "operations",
               "arch_oversized.toml": "more than the", "arch_injection.toml": "is not allowed"}
    for name in arch_files:
        add(Attempt("--arch", ["gram", "--arch", files[name], "--out", npz], out=npz,
                    expect=reasons.get(name)))
    for name in ("arch_injection.toml", "arch_huge_repeat.toml", "arch_nested.toml", "arch_deep_toml.toml"):
        if name != "arch_nested.toml":  # its symbolic maps are those of three distinct layers: fine
            add(Attempt("--arch", ["kernel", "--arch", files[name]]))
        add(Attempt("--arch", ["finite-width", "--arch", files[name], "--out", png], out=png))
        add(Attempt("--arch", ["validate", "--arch", files[name], "--width", "64", "--samples", "10"]))
    add(Attempt("--arch", ["validate", "--arch", files["arch_huge_width.toml"], "--width", "64"]))

    # --inputs, --input-kernel
    arrays = ("object", "nan", "inf", "complex", "strings", "one_d", "three_d", "empty", "no_features",
              "scalar", "truncated", "header_only", "lying_header", "text", "folder", "missing")
    gram = ["gram", "-a", "relu", "--depth", "2", "--cw", "2", "--out", npz]
    for name in arrays + ("huge_values",):
        add(Attempt("--inputs", gram + ["--inputs", files[name]], out=npz))
    for name in ("object", "nan", "complex", "truncated", "strings", "empty"):
        add(Attempt("--inputs", ["validate", "-a", "relu", "--cw", "2", "--depth", "2", "--width", "64",
                                 "--samples", "10", "--inputs", files[name], "--out", png], out=png))
        add(Attempt("--inputs", ["gram", "--arch", str(folder / "arch_ok.toml"), "--inputs", files[name],
                                 "--out", npz], out=npz))
    for name in arrays + ("kernel_not_square", "kernel_not_psd", "kernel_asymmetric", "kernel_nan"):
        add(Attempt("--input-kernel", gram + ["--input-kernel", files[name]], out=npz))

    # predict and validate-trained: --inputs, --targets, --test-inputs (file doors) and their numbers
    good = files["good"]
    predict = ["predict", "-a", "relu", "--depth", "3", "--cw", "2"]
    for name in ("object", "nan", "complex", "truncated", "one_d", "empty", "strings", "missing"):
        add(Attempt("--targets", predict + ["--inputs", good, "--targets", files[name], "--test-inputs", good,
                                            "--out", npz], out=npz))
        add(Attempt("--test-inputs", predict + ["--inputs", good, "--targets", files["targets"],
                                                "--test-inputs", files[name], "--out", npz], out=npz))
        add(Attempt("--test-inputs", ["gram", "-a", "relu", "--depth", "2", "--cw", "2", "--inputs", good,
                                      "--test-inputs", files[name], "--out", npz], out=npz))
        add(Attempt("--inputs", predict + ["--inputs", files[name], "--targets", files["targets"],
                                           "--test-inputs", good, "--out", npz], out=npz))
    task = ["--inputs", good, "--targets", files["targets"], "--test-inputs", good, "--out", npz]
    for option, values in (("--time", ("-1", "nan", "-inf")), ("--noise", ("-1", "nan", "inf")),
                           ("--learning-rate", ("-1", "nan", "inf")), ("--steps", ("-1", "nan"))):
        for value in values:
            add(Attempt(option, predict + task + [option, value], out=npz))
    trained = ["validate-trained", "-a", "relu", "--depth", "3", "--cw", "2", "--out", png]
    for option, values in (("--networks", ("-1", "0", "1", "nan", "1000000000000")),
                           ("--widths", ("100000,200000,300000", "1,1,1", "-1,2,3", "nan")),
                           ("--steps", ("-1", "100000000", "5,1")), ("--learning-rate", ("nan", "inf"))):
        for value in values:
            add(Attempt(option, trained + [option, value], out=png))

    # numeric options
    def numeric(door_args: list[str], option: str, values, out_file: str | None = None):
        for value in values:
            args = door_args + [option, value] + (["--out", out_file] if out_file else [])
            add(Attempt(option, args, out=out_file))

    gram_base = {"--depth": "2", "--cw": "2"}

    def without(base: dict, option: str) -> list[str]:
        return [x for k, v in base.items() if k != option for x in (k, v)]

    for option in ("--cw", "--cb", "--lambda-w", "--lambda-b"):
        numeric(["gram", "-a", "relu"] + without(gram_base, option), option, NUMERIC_BAD, npz)
    numeric(["gram", "-a", "relu", "--depth", "2"], "--cw", ("1e308",), npz)
    numeric(["gram", "-a", "relu", "--cw", "2"], "--depth", ("-1", "0", "nan", "inf", "1e9", "10" * 20,
                                                              "1000000000000"), npz)
    relu = ["gram", "-a", "relu", "--depth", "2", "--cw", "2"]
    numeric(relu, "--devices", ("-1", "0", "nan", "100000"), npz)
    numeric(relu, "--method", ("bogus", ""), npz)
    validate = ["validate", "-a", "relu", "--cw", "2", "--depth", "2"]
    numeric(validate + ["--samples", "10"], "--width", ("-1", "0", "nan", "inf", "1000000000"), png)
    numeric(validate + ["--width", "64"], "--samples", ("-1", "0", "1", "nan", "inf", "1000000000000"), png)
    numeric(validate + ["--samples", "10"], "--widths", ("-1,2", "0,64", "nan", "64,inf", "1e12,1e12", ","),
            png)
    numeric(validate + ["--width", "64", "--samples", "10"], "--z-max", ("-1", "0", "nan", "inf"), png)
    numeric(validate + ["--width", "64", "--samples", "10"], "--seed", ("-1", "nan", "1e999"), png)
    numeric(["validate", "-a", "relu", "--depth", "2", "--width", "64", "--samples", "10"], "--cw",
            NUMERIC_BAD, png)
    numeric(["validate", "-a", "relu", "--cw", "2", "--width", "64", "--samples", "10"], "--depth",
            ("-1", "0", "nan", "1000000000"), png)
    fw = ["finite-width", "-a", "relu", "--cw", "2"]
    numeric(fw, "--depth", ("-1", "0", "nan", "inf", "1000000000000"), png)
    numeric(fw + ["--depth", "3"], "--width", ("-1", "0", "nan", "inf"), png)
    numeric(fw + ["--depth", "3"], "--k1", ("-1", "0", "nan", "inf"), png)
    numeric(["finite-width", "-a", "relu", "--depth", "3"], "--cw", NUMERIC_BAD, png)
    profile = ["profile", "-a", "tanh", "--cw", "1"]
    numeric(profile, "--depth", ("-1", "0", "nan", "1000000000000"), png)
    numeric(profile + ["--depth", "5"], "--k0", ("-1", "0", "nan", "inf"), png)
    numeric(profile + ["--depth", "5"], "--rho0", ("-2", "2", "nan", "inf"), png)
    numeric(["profile", "-a", "tanh", "--depth", "5"], "--cw", NUMERIC_BAD, png)
    numeric(["phase", "-a", "tanh"], "--grid", ("-1", "0", "nan", "1000000"), png)
    numeric(["phase", "-a", "tanh"], "--cw-max", NUMERIC_BAD + ("0",), png)
    numeric(["phase", "-a", "tanh"], "--cb-max", NUMERIC_BAD, png)
    numeric(["criticality", "-a", "tanh"], "--k0", ("-1", "0", "nan", "inf"))
    numeric(["gate", "-a", "tanh"], "--lambda", ("-1", "0", "nan", "inf"))
    for value in ("-1", "0", "nan", "1000000000000"):
        add(Attempt("gate --inputs", ["gate", "-a", "tanh", "--inputs", value]))
    return out


# ------------------------------------------------------------------------------------------------
# Running attempts


def _clean(attempt: Attempt, code, stderr: str, stdout: str, caught: list, folder: Path) -> Outcome:
    lines = stderr.strip().splitlines()
    problems = []
    if code != 2:
        problems.append(f"exit status {code}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} lines on stderr")
    if attempt.expect is not None and attempt.expect not in stderr:
        problems.append(f"refused without saying {attempt.expect!r}")
    if "Traceback" in stderr + stdout:
        problems.append("traceback")
    if caught:
        problems.append(f"warning: {caught[0]}")
    if (folder / CANARY).exists():
        problems.append("canary file created")
        (folder / CANARY).unlink()
    if attempt.out is not None and Path(attempt.out).exists():
        problems.append("output file written")
        Path(attempt.out).unlink()
    left = [p.name for p in folder.glob(".derive-*")]
    if left:
        problems.append(f"temporary files left: {left}")
        for name in left:
            (folder / name).unlink()
    return Outcome(attempt, not problems, "; ".join(problems), stderr)


def run_in_process(attempt: Attempt, folder: Path) -> Outcome:
    """Run one attempt through :func:`cli.main` in this process, in ``folder``."""
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    env = {"DERIVE_RULES_PATH": "", **attempt.env}
    cwd = os.getcwd()
    os.chdir(folder)
    code = None
    try:
        with warnings.catch_warnings(record=True) as caught, runner.isolation(env=env) as streams:
            warnings.simplefilter("always")
            try:
                cli.main(list(attempt.args))
                code = 0
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:  # noqa: BLE001 - anything else escaped the command
                import traceback

                sys.stderr.write(traceback.format_exc())
                code = f"uncaught {type(exc).__name__}"
            stdout = streams[0].getvalue().decode(errors="replace")
            stderr = streams[1].getvalue().decode(errors="replace")
    finally:
        os.chdir(cwd)
    leaked = [str(w.message) for w in caught
              if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return _clean(attempt, code, stderr, stdout, leaked, folder)


def run_subprocess(attempt: Attempt, folder: Path) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DERIVE_RULES_PATH": "", **attempt.env}
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "cli", *attempt.args],
                         capture_output=True, text=True, cwd=folder, env=env, timeout=120)
    return _clean(attempt, res.returncode, res.stderr, res.stdout, [], folder)


ROOT = Path(__file__).resolve().parents[1]


def run_all(folder: Path, report=None) -> list[Outcome]:
    """Every attempt, in this process; ``report(outcome, seconds)`` after each."""
    folder.mkdir(parents=True, exist_ok=True)
    files = make_files(folder)
    dense = '[[layers]]\ntype = "dense"\nC_W = 2\n'
    relu = '[[layers]]\ntype = "activation"\nactivation = "relu"\n'
    (folder / "arch_ok.toml").write_text(dense + relu + dense)
    out = []
    for attempt in attempts(files, folder):
        start = time.perf_counter()
        out.append(run_in_process(attempt, folder))
        if report is not None:
            report(out[-1], time.perf_counter() - start)
    return out


def summary(outcomes: list[Outcome]) -> str:
    clean = sum(o.clean for o in outcomes)
    doors = sorted({o.attempt.door for o in outcomes})
    per_door = ", ".join(f"{d} {sum(o.clean for o in outcomes if o.attempt.door == d)}/"
                         f"{sum(o.attempt.door == d for o in outcomes)}" for d in doors)
    return f"red team: tried {len(outcomes)}, refused cleanly {clean} ({per_door})"


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[Outcome]:
    return run_all(tmp_path_factory.mktemp("redteam"))


DOORS = ("--activation", "--param", "--claim", "--claim-latex", "--define", "--claim-file", "--rules",
         "DERIVE_RULES_PATH", "--arch", "--inputs", "--input-kernel", "--cw", "--cb", "--lambda-w",
         "--lambda-b", "--depth", "--devices", "--method", "--width", "--widths", "--samples", "--z-max",
         "--seed", "--k1", "--k0", "--rho0", "--grid", "--cw-max", "--cb-max", "--lambda", "gate --inputs",
         "--targets", "--test-inputs", "--time", "--noise", "--learning-rate", "--steps", "--networks")


@pytest.mark.slow
@pytest.mark.parametrize("door", DOORS)
def test_door_refuses_cleanly(outcomes, door):
    tried = [o for o in outcomes if o.attempt.door == door]
    assert tried, f"no attempts at {door}"
    bad = [f"{o.attempt.label}: {o.why}\n    {o.stderr.strip()[:300]}" for o in tried if not o.clean]
    assert not bad, f"{len(bad)} of {len(tried)} attempts at {door} not refused cleanly:\n" + "\n".join(bad)


def test_counts(outcomes):
    print("\n" + summary(outcomes))
    assert {o.attempt.door for o in outcomes} == set(DOORS)
    assert len(outcomes) >= 300


def test_a_refusal_catches_what_it_should(tmp_path):
    """The checks above can fail: a request that succeeds, or an injection that ran, is not clean."""
    ok = run_in_process(Attempt("--activation", ["kernel", "-a", "relu", "-f", "json"]), tmp_path)
    assert not ok.clean and "exit status 0" in ok.why
    (tmp_path / CANARY).write_text("")
    planted = run_in_process(Attempt("--activation", ["kernel", "-a", TOUCH]), tmp_path)
    assert not planted.clean and "canary" in planted.why
    out = tmp_path / "out.npz"
    written = run_in_process(Attempt("--inputs", ["gram", "-a", "relu", "--depth", "2", "--cw", "2", "--out",
                                                  str(out)], out=str(out)), tmp_path)
    assert not written.clean and "output file written" in written.why


@pytest.mark.parametrize("args", [
    ["gram", "--activation", "relu", "--depth", "1000000000", "--cw", "2", "--out", "k.npz"],
    ["validate", "--activation", "relu", "--cw", "2", "--depth", "3", "--width", "128", "--samples",
     "1000000000000", "--out", "v.png"],
    ["kernel", "--activation", "exp(exp(exp(z)))"],
    ["kernel", "--activation", "__import__('os').system('touch CANARY')"],
    ["gram", "-a", "relu", "--depth", "nan", "--cw", "2"],
])
@pytest.mark.slow
def test_subprocess_refusals(tmp_path, args):
    """The refusals a user sees: exit status 2 and one line on stderr, from a real process."""
    out = next((args[i + 1] for i, a in enumerate(args) if a == "--out"), None)
    outcome = run_subprocess(Attempt("subprocess", args, out=None if out is None else str(tmp_path / out)),
                             tmp_path)
    assert outcome.clean, f"{outcome.why}: {outcome.stderr}"


def test_work_estimate_refusal_names_the_limit(tmp_path):
    args = ["gram", "-a", "relu", "--depth", "1000000000", "--cw", "2"]
    outcome = run_subprocess(Attempt("subprocess", args), tmp_path)
    assert outcome.clean, outcome.why
    assert "operations" in outcome.stderr and "DERIVE_MAX_WORK=" in outcome.stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.0, 3.0, 8.0])
def test_interrupt_leaves_previous_output(tmp_path, delay):
    """Ctrl-C during a run with --out, while importing, deriving or sampling: the previous file is
    untouched, no partial file is left, exit status 130 (a KeyboardInterrupt raised inside JAX's
    garbage-collector callback used to be ignored, and the run went on to overwrite the file)."""
    out = tmp_path / "v.png"
    out.write_bytes(b"previous")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "validate", "-a", "tanh", "--cw", "1", "--depth",
                             "3", "--width", "256", "--samples", "10000", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # imports, derivation, and into the sampling
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert out.read_bytes() == b"previous"
    assert not list(tmp_path.glob(".derive-*"))


def test_interrupted_write_leaves_the_previous_file(tmp_path):
    """The helper every --out goes through: an interrupted writer leaves the old file and no temporary."""
    from derive.core.files import write_atomic

    out = tmp_path / "k.npz"
    out.write_bytes(b"previous")

    def half_then_interrupt(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, half_then_interrupt)
    assert out.read_bytes() == b"previous" and not list(tmp_path.glob(".derive-*"))
    write_atomic(out, lambda tmp: Path(tmp).write_bytes(b"new"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.read_bytes() == b"new" and out.stat().st_mode & 0o777 == 0o666 & ~umask


if __name__ == "__main__":
    import tempfile

    if "--count" not in sys.argv and "-v" not in sys.argv:
        sys.exit("usage: python tests/test_redteam.py --count [-v]")
    sys.path.insert(0, str(ROOT))
    import jax

    jax.config.update("jax_enable_x64", True)
    def report(o: Outcome, seconds: float) -> None:
        if "-v" in sys.argv or not o.clean:
            print(("ok    " if o.clean else "FAIL  ") + f"{seconds:5.1f}s " + o.attempt.label
                  + ("" if o.clean else f": {o.why}: {o.stderr.strip()[-300:]}"), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp), report)
    print(summary(results))
    sys.exit(0 if all(o.clean for o in results) else 1)
