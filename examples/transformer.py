"""Pre-LN transformer blocks at initialisation: the kernel grows linearly through depth.

Dinan, Yaida & Zhang ("Effective Theory of Transformers at Initialization", arXiv:2304.02034)
show that with pre-LayerNorm and residual connections every block adds an O(1) amount to the
residual stream's kernel, because each branch sees a normalised input: K^(l+1) = K^(l) +
C_O C_V attend(F) + C_X <sigma sigma>_{C_W F}, F the LayerNorm'd kernel. So the diagonal grows
linearly in depth (no exponential explosion or decay, no tuning of the skip weight), while the
correlation between tokens and inputs drifts slowly. This script

1. reads the architecture from examples/architectures/ (their variances: C_Q = C_K = C_V = 1/2,
   C_O = C_U = 1/3, C_W = 2/5, C_X = 8/5, GELU) and sets the depth. ``--attention dot-product``
   (the default, pre_ln_transformer_dot_product.toml) is attention as transformers use it:
   independent query and key weights and logits q.k / sqrt(n/H), which stay random at infinite
   width (the theory averages the attention weights over their Gaussian law);
   ``--attention tied`` (pre_ln_transformer.toml) ties the query and key weights and scales the
   logits by 1/(n/H), where the attention weights are deterministic;
2. derives the kernel and NTK of every block at infinite width (generated JAX);
3. fits the diagonal kernel per block to a + b l and reports the increments;
4. samples real finite-width transformers built from the same description and compares every block's
   kernel with the theory (z-scores, 5 sigma), and the output NTK.

Run:  python examples/transformer.py [--attention dot-product|tied] [--blocks 12] [--width 256]
          [--samples 100] [--out growth.png]
(a few minutes on two CPU cores, most of it sampling; the largest |z| grows with depth because
the O(depth / width) finite-width correction does)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from derive import arch
from derive.kernels.arch import arch_kernels
from derive.sampling.arch import sample_arch

HERE = Path(__file__).resolve().parent
FILES = {"dot-product": "pre_ln_transformer_dot_product.toml", "tied": "pre_ln_transformer.toml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", choices=tuple(FILES), default="dot-product",
                        help="attention logits: independent q, k and 1/sqrt(n/H) (dot-product) or tied, 1/(n/H)")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="plot (.png) of the diagonal kernel per block")
    args = parser.parse_args()

    base = arch.load_arch(HERE / "architectures" / FILES[args.attention])
    embedding, blocks = base.items
    net = arch.serial(embedding, arch.repeat(args.blocks, blocks.body, label="block"), name=base.name)

    tokens = np.random.default_rng(args.seed).standard_normal((2, 5, 8))  # 2 sequences of 5 tokens, d = 8
    theory = arch_kernels(net, tokens)
    diagonal = np.array([np.mean(np.diagonal(k.reshape(10, 10))) for k in theory.nngp])
    depth = np.arange(len(diagonal))
    slope, intercept = np.polyfit(depth[1:], diagonal[1:], 1)
    residual = diagonal[1:] - (intercept + slope * depth[1:])
    print(f"{net.name}: {args.blocks} blocks, 2 sequences x 5 tokens")
    print(f"mean diagonal kernel per block: {np.array2string(diagonal, precision=4)}")
    print(f"linear fit a + b l: b = {slope:.5f} per block, largest deviation {np.abs(residual).max():.2e} "
          f"({np.abs(residual).max() / diagonal[-1]:.1e} of the final kernel)")
    increments = np.diff(diagonal)
    print(f"increments per block: min {increments.min():.5f}, max {increments.max():.5f}")
    last = theory.nngp[-1].reshape(10, 10)
    first = theory.nngp[0].reshape(10, 10)
    d, d0 = np.sqrt(np.diagonal(last)), np.sqrt(np.diagonal(first))
    print(f"correlation between the two sequences' first tokens after the last block: "
          f"{last[0, 5] / (d[0] * d[5]):.4f} (input {first[0, 5] / (d0[0] * d0[5]):.4f})")

    mc = sample_arch(net, tokens, args.width, n_networks=args.samples, seed=args.seed, progress=True)
    worst = [float(np.abs(z).max()) for z in mc.nngp_z(theory)]
    print(f"Monte Carlo, width {args.width}, {args.samples} networks: largest |z| per block "
          f"{np.array2string(np.array(worst), precision=2)}; output NTK largest |z| "
          f"{float(np.abs(mc.ntk_z(theory)).max()):.2f}")
    verdict = max(worst) < 5 and float(np.abs(mc.ntk_z(theory)).max()) < 5
    print("agreement within 5 sigma" if verdict else "DISAGREEMENT beyond 5 sigma")

    if args.out is not None:
        from matplotlib.ticker import MaxNLocator

        from derive.core.figures import (
            InlineFigure,
            error_bars,
            reference_line,
            save_figure,
            series_style,
            style_axis,
        )

        est = np.array([np.mean(np.diagonal(m.mean)) for m in mc.nngp])
        err = np.array([np.sqrt(np.sum(np.diagonal(m.mean_stderr) ** 2)) / 10 for m in mc.nngp])
        fig = InlineFigure(figsize=(12, 5.0), layout="constrained")
        ax, dev = fig.subplots(1, 2)
        ax.plot(depth, diagonal, label="theory (infinite width)", **series_style(0, marker=False))
        ax.plot(depth, intercept + slope * depth, label=rf"linear fit $a + b\,\ell$, $b = {slope:.3f}$ per block",
                **series_style(2, marker=False))
        sampled = rf"{args.samples} sampled networks, width $n = {args.width}$ ($\pm 1$ s.e.)"
        error_bars(ax, depth, est, err, 1, label=sampled, markersize=4.5)
        error_bars(dev, depth, est - diagonal, err, 1, label=sampled, markersize=4.5)
        reference_line(dev, y=0.0, label="theory")
        for a in (ax, dev):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        block = r"block $\ell$ (0: the embedding)"
        style_axis(ax, block, r"mean diagonal kernel $\bar K^{(\ell)}$ of the residual stream",
                   "theory and Monte Carlo", legend_loc="upper left")
        style_axis(dev, block, r"$\bar K^{(\ell)}_{\mathrm{MC}} - \bar K^{(\ell)}_{\mathrm{theory}}$",
                   "Monte Carlo $-$ theory (includes the $O(\\ell/n)$ correction)", legend=True)
        fig.suptitle(f"{net.name}: linear growth of the kernel; {args.blocks} blocks, 2 sequences of 5 tokens",
                     fontsize=11)
        save_figure(fig, args.out, dpi=120)
        print(f"wrote {args.out}")
    raise SystemExit(0 if verdict else 1)


if __name__ == "__main__":
    main()
