"""Architectures against Neural Tangents: the same networks, identical inputs, NNGP and NTK compared.

    python benchmarks/architectures_nt.py --nt-python /tmp/nt-venv/bin/python [--format json]

Neural Tangents 0.6.5 runs in its own environment (``../shared/tools/make-nt-venv.sh`` makes one);
each case's description is translated to ``stax`` layers (Dense -> Dense(W_std = sqrt(C_W),
b_std = sqrt(C_b)), residual -> FanOut(2), parallel(Identity, branch), FanInSum with gamma folded
into the branch's last layer, LayerNorm, Conv, AvgPool, GlobalAvgPool, Flatten, attention ->
GlobalSelfAttention(linear_scaling=True), and dot-product attention with the identity mechanism ->
GlobalSelfAttention(linear_scaling=False, attention_mechanism="IDENTITY"), the only 1/sqrt(n)-logit
kernel Neural Tangents has), run there on the same inputs, and compared entry by
entry: the printed figure is max |ours - NT| / max |NT| for the NNGP and the NTK of the output.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derive import arch as A  # noqa: E402
from derive.arch.description import Layer, Repeat, Serial  # noqa: E402
from derive.kernels.arch import arch_kernels  # noqa: E402

NT_ACTIVATIONS = {"relu": "Relu()", "erf": "Erf()", "gelu": "Gelu()", "abs": "Abs()", "linear": "Identity()"}

# Runs inside the Neural Tangents environment: builds stax layers from the JSON spec (no eval of it).
NT_SCRIPT = r'''
import json, sys, time
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
from neural_tangents import stax

def build(items):
    layers = []
    for it in items:
        kind = it["kind"]
        if kind == "Dense":
            layers.append(stax.Dense(it["width"], W_std=it["W_std"], b_std=it["b_std"]))
        elif kind == "Conv":
            layers.append(stax.Conv(it["width"], tuple(it["filter"]), tuple(it["stride"]), it["padding"],
                                    W_std=it["W_std"], b_std=it["b_std"]))
        elif kind == "Relu":
            layers.append(stax.Relu())
        elif kind == "Erf":
            layers.append(stax.Erf())
        elif kind == "Gelu":
            layers.append(stax.Gelu())
        elif kind == "Abs":
            layers.append(stax.Abs())
        elif kind == "Identity":
            layers.append(stax.Identity())
        elif kind == "LayerNorm":
            layers.append(stax.LayerNorm(axis=-1, eps=it["eps"]))
        elif kind == "AvgPool":
            layers.append(stax.AvgPool(tuple(it["window"]), tuple(it["stride"]), it["padding"]))
        elif kind == "GlobalAvgPool":
            layers.append(stax.GlobalAvgPool())
        elif kind == "Flatten":
            layers.append(stax.Flatten())
        elif kind == "Attention":
            layers.append(stax.GlobalSelfAttention(it["width"], it["width"], it["width"], it["heads"],
                linear_scaling=True, W_key_std=it["W_key_std"], W_query_std=it["W_query_std"],
                W_value_std=it["W_value_std"], W_out_std=it["W_out_std"], b_std=it["b_std"]))
        elif kind == "DotAttention":
            layers.append(stax.GlobalSelfAttention(it["width"], it["width"], it["width"], it["heads"],
                linear_scaling=False, W_key_std=it["W_key_std"], W_query_std=it["W_query_std"],
                W_value_std=it["W_value_std"], W_out_std=it["W_out_std"], b_std=it["b_std"],
                attention_mechanism=it["mechanism"]))
        elif kind == "Residual":
            layers.append(stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), build(it["branch"])),
                                      stax.FanInSum()))
        elif kind == "Repeat":
            layers.append(stax.repeat(build(it["body"]), it["times"]))
        else:
            raise SystemExit("unknown layer " + kind)
    return stax.serial(*layers)

spec = json.load(open(sys.argv[1]))
out = {}
for case in spec:
    x = np.load(case["inputs"])
    _, _, kernel_fn = build(case["layers"])
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")
    k = kernel_fn(x, None, ("nngp", "ntk"))
    jax.block_until_ready(k)
    t0 = time.perf_counter()
    k = kernel_fn(x, None, ("nngp", "ntk"))
    jax.block_until_ready(k)
    seconds = time.perf_counter() - t0
    np.save(case["out"] + "_nngp.npy", np.asarray(k[0]))
    np.save(case["out"] + "_ntk.npy", np.asarray(k[1]))
    out[case["name"]] = seconds
print(json.dumps(out))
'''


class NotTranslatable(ValueError):
    pass


def _scaled(items: list[dict], gamma: float) -> list[dict]:
    """Fold the branch weight gamma into the branch's last weighted layer."""
    items = [dict(it) for it in items]
    last = items[-1]
    if last["kind"] in ("Dense", "Conv"):
        last["W_std"] *= gamma
        last["b_std"] *= gamma
    elif last["kind"] in ("Attention", "DotAttention"):
        last["W_out_std"] *= gamma
        last["b_std"] = None if last["b_std"] is None else last["b_std"] * gamma
    else:
        raise NotTranslatable("residual branch must end in a weighted layer")
    return items


def to_nt(net: Serial, width: int = 64) -> list[dict]:
    """The description as Neural Tangents stax layers (a JSON-able list)."""
    out = []
    for item in net.items:
        if isinstance(item, Repeat):
            out.append({"kind": "Repeat", "times": item.times, "body": to_nt(item.body, width)})
            continue
        out.append(_layer_to_nt(item, width))
    return out


def _layer_to_nt(layer: Layer, width: int) -> dict:
    kind = layer.rule.name
    if kind == "dense":
        if layer.value("lambda_W") != layer.value("C_W") or layer.value("lambda_b") != layer.value("C_b"):
            raise NotTranslatable("Neural Tangents' NTK has lambda = C")
        return {"kind": "Dense", "width": width, "W_std": math.sqrt(layer.value("C_W")),
                "b_std": math.sqrt(layer.value("C_b"))}
    if kind == "conv":
        return {"kind": "Conv", "width": width, "filter": list(layer.option("filter")),
                "stride": list(layer.option("stride")), "padding": layer.option("padding"),
                "W_std": math.sqrt(layer.value("C_W")), "b_std": math.sqrt(layer.value("C_b"))}
    if kind == "activation":
        if layer.activation not in NT_ACTIVATIONS or layer.activation_params:
            raise NotTranslatable(f"no closed-form Neural Tangents layer for {layer.activation}")
        return {"kind": NT_ACTIVATIONS[layer.activation].removesuffix("()")}
    if kind == "layernorm":
        return {"kind": "LayerNorm", "eps": layer.value("eps")}
    if kind == "avg_pool":
        return {"kind": "AvgPool", "window": list(layer.option("window")), "stride": list(layer.option("stride")),
                "padding": layer.option("padding")}
    if kind == "global_avg_pool":
        return {"kind": "GlobalAvgPool"}
    if kind == "flatten":
        return {"kind": "Flatten"}
    if kind == "attention":
        C_b = layer.value("C_b")
        return {"kind": "Attention", "width": width, "heads": layer.option("heads"),
                "W_key_std": math.sqrt(layer.value("C_K")), "W_query_std": math.sqrt(layer.value("C_Q")),
                "W_value_std": math.sqrt(layer.value("C_V")), "W_out_std": math.sqrt(layer.value("C_O")),
                "b_std": math.sqrt(C_b) if C_b > 0 else None}
    if kind == "dot_product_attention":
        if layer.option("mechanism") != "identity":
            raise NotTranslatable("Neural Tangents has no kernel for softmax attention with 1/sqrt(n) logits")
        for name in ("Q", "K", "V", "O", "b"):
            if layer.value(f"lambda_{name}") != layer.value(f"C_{name}"):
                raise NotTranslatable("Neural Tangents' NTK has lambda = C")
        C_b = layer.value("C_b")
        return {"kind": "DotAttention", "width": width, "heads": layer.option("heads"), "mechanism": "IDENTITY",
                "W_key_std": math.sqrt(layer.value("C_K")), "W_query_std": math.sqrt(layer.value("C_Q")),
                "W_value_std": math.sqrt(layer.value("C_V")), "W_out_std": math.sqrt(layer.value("C_O")),
                "b_std": math.sqrt(C_b) if C_b > 0 else None}
    if kind == "residual":
        if layer.value("xi") != 1:
            raise NotTranslatable("Neural Tangents' FanInSum has skip weight 1")
        return {"kind": "Residual", "branch": _scaled(to_nt(layer.branch, width), layer.value("gamma"))}
    raise NotTranslatable(f"no Neural Tangents layer for {kind}")


def _from_nt_layout(a: np.ndarray, spatial_axes: int) -> np.ndarray:
    """NT's (N, N, s1, s1', s2, s2', ...) -> ours (N, s1, s2, ..., N, s1', s2', ...)."""
    k = spatial_axes
    order = [0] + [2 + 2 * i for i in range(k)] + [1] + [3 + 2 * i for i in range(k)]
    return np.transpose(a, order)


def cases(rng: np.random.Generator) -> list[tuple[str, Serial, np.ndarray]]:
    x = rng.normal(size=(6, 10))
    seq = rng.normal(size=(3, 5, 4))
    img = rng.normal(size=(2, 5, 4, 3))
    pre_ln_block = [A.residual(A.layer_norm(), A.attention(heads=2, C_Q=0.5, C_K=0.5, C_V=0.5, C_O=1 / 3)),
                    A.residual(A.layer_norm(), A.dense(0.4), A.activation("gelu"), A.dense(1.6))]
    return [
        ("relu MLP, depth 10", A.mlp(10, "relu", 2.0, 0.05), x),
        ("residual MLP (pre-LN, gelu), 8 blocks", A.serial(
            A.dense(1.0, 0.1), A.repeat(8, A.residual(A.layer_norm(), A.dense(2.0, 0.1), A.activation("gelu"),
                                                      A.dense(1.0), gamma=0.6))), x),
        ("post-LN residual erf", A.serial(A.dense(1.5), A.repeat(4, A.residual(
            A.dense(1.2), A.activation("erf"), A.dense(1.0, 0.2), gamma=0.8), A.layer_norm())), x),
        ("1-d CNN: conv SAME/VALID, stride, avg pool, flatten", A.serial(
            A.conv((3,), C_W=2.0, C_b=0.1), A.activation("relu"), A.conv((2,), stride=(2,), padding="VALID"),
            A.activation("erf"), A.avg_pool((2,), stride=(1,)), A.flatten(), A.dense(1.0, 0.1)), seq),
        ("2-d CNN, global average pool", A.serial(
            A.conv((3, 2), C_W=1.5, C_b=0.05), A.activation("relu"), A.conv((2, 2), stride=(2, 1), C_W=2.0),
            A.activation("abs"), A.avg_pool((2, 2), stride=(1, 1), padding="SAME"), A.global_avg_pool(),
            A.dense()), img),
        ("pre-LN transformer, 3 blocks (Dinan et al. variances)", A.serial(
            A.dense(1.0), A.repeat(3, *pre_ln_block), A.layer_norm()), seq),
        ("dot-product attention, 1/sqrt(n) logits, identity weights, pre-LN", A.serial(
            A.dense(1.0), A.repeat(2, A.residual(A.layer_norm(), A.dot_product_attention(
                heads=2, C_Q=0.5, C_K=0.8, C_V=0.5, C_O=0.7, C_b=0.05, mechanism="identity"))),
            A.layer_norm(), A.dense(1.0)), seq),
    ]


def run(nt_python: str, repeats: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    rows, spec = [], []
    tmp = Path(tempfile.mkdtemp(prefix="derive-nt-"))
    ours = {}
    for i, (name, net, x) in enumerate(cases(rng)):
        np.save(tmp / f"x{i}.npy", x)
        spec.append({"name": name, "inputs": str(tmp / f"x{i}.npy"), "out": str(tmp / f"c{i}"),
                     "layers": to_nt(net)})
        result = arch_kernels(net, x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            arch_kernels(net, x)
            times.append(time.perf_counter() - t0)
        ours[name] = (result, min(times), x.ndim - 2)
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "nt_reference.py").write_text(NT_SCRIPT)
    done = subprocess.run([nt_python, str(tmp / "nt_reference.py"), str(tmp / "spec.json")], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"Neural Tangents run failed:\n{done.stderr[-3000:]}")
    nt_seconds = json.loads(done.stdout.strip().splitlines()[-1])
    for i, item in enumerate(spec):
        name = item["name"]
        result, seconds, _ = ours[name]
        nngp, ntk = result.output
        k = (nngp.ndim - 2) // 2
        nt_nngp = _from_nt_layout(np.load(item["out"] + "_nngp.npy"), k)
        nt_ntk = _from_nt_layout(np.load(item["out"] + "_ntk.npy"), k)
        M = int(np.sqrt(nngp.size))
        off = ~np.eye(M, dtype=bool)  # entries between different (input, position) pairs

        def off_diff(a, b):
            a, b = a.reshape(M, M)[off], b.reshape(M, M)[off]
            return float(np.abs(a - b).max() / np.abs(b).max())

        rows.append({"case": name, "shape": list(nngp.shape),
                     "nngp_off_diagonal_rel_diff": off_diff(nngp, nt_nngp),
                     "ntk_off_diagonal_rel_diff": off_diff(ntk, nt_ntk),
                     "nngp_rel_diff": float(np.abs(nngp - nt_nngp).max() / np.abs(nt_nngp).max()),
                     "ntk_rel_diff": float(np.abs(ntk - nt_ntk).max() / np.abs(nt_ntk).max()),
                     "derive_seconds": seconds, "nt_seconds": nt_seconds[name]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nt-python", required=True, help="python of a venv with neural-tangents 0.6.5")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()
    rows = run(args.nt_python)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return
    print(f"{'case':56s} {'NNGP diff':>10s} {'NTK diff':>10s} {'off-diag':>9s} {'off-diag':>9s} "
          f"{'derive s':>9s} {'NT s':>9s}")
    print(f"{'':56s} {'':>10s} {'':>10s} {'NNGP':>9s} {'NTK':>9s}")
    for r in rows:
        print(f"{r['case']:56s} {r['nngp_rel_diff']:10.1e} {r['ntk_rel_diff']:10.1e} "
              f"{r['nngp_off_diagonal_rel_diff']:9.1e} {r['ntk_off_diagonal_rel_diff']:9.1e} "
              f"{r['derive_seconds']:9.4f} {r['nt_seconds']:9.4f}")
    worst = max(max(r["nngp_rel_diff"], r["ntk_rel_diff"]) for r in rows)
    worst_off = max(max(r["nngp_off_diagonal_rel_diff"], r["ntk_off_diagonal_rel_diff"]) for r in rows)
    print(f"worst relative difference {worst:.1e}, off the diagonal {worst_off:.1e} (target 1e-8). On the "
          "diagonal (rho = 1) Neural Tangents' ReLU NTK carries its own rounding error of about 1e-8; "
          "tests/test_arch.py checks ours there against the exact single-input recursion.")


if __name__ == "__main__":
    main()
