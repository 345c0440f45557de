"""Architectures: the description builders and files (``from derive import arch``).

``arch.serial(arch.dense(C_W=1), arch.repeat(10, arch.residual(...)))`` and :func:`load_arch` build
the one immutable description that the kernels, the finite-width maps and the sampler all read
(:mod:`derive.arch.description`); :func:`dense_network` (and :func:`mlp`) is PDLT's dense network as
one such description.
"""

from derive.arch.description import (DenseNetwork, Layer, Repeat, Serial, activation, activation_layer,  # noqa: I001
                                     arch_from_dict, as_dense_network, attention, avg_pool, check_derivable,
                                     conv, dense, dense_network, dot_product_attention, flatten,
                                     global_avg_pool, layer, layer_norm, load_arch, mlp, repeat, residual,
                                     serial)

__all__ = ["DenseNetwork", "Layer", "Repeat", "Serial", "activation", "activation_layer", "arch_from_dict",
           "as_dense_network", "attention", "avg_pool", "check_derivable", "conv", "dense", "dense_network",
           "dot_product_attention", "flatten", "global_avg_pool", "layer", "layer_norm", "load_arch", "mlp",
           "repeat", "residual", "serial"]
