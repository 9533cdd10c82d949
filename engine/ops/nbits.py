"""com.microsoft MatMulNBits: a MatMul with 2-, 4- or 8-bit weights in blocks, onnxruntime's format for
weight-only quantization (`MatMulNBitsQuantizer`'s default, 4 bits unless told; its optimiser also turns the
QDQ format's blocked DequantizeLinear + MatMul into it).

B holds the weight's transpose [N, K] as bytes [N, blocks, block_size x bits / 8], 8 / bits values each
(the lowest bits first), with a scale per row and block and an optional zero point (packed the same way,
or float; 2^(bits - 1) without one). The loader folds B into a float [K, N] parameter (`ir.NBitsParam`),
so the op is A @ B + bias; an unfolded B (read by several nodes) is unpacked here. That is onnxruntime's result at
accuracy_level 0 (equal to 1e-5). At accuracy_level 4, what its optimiser writes, its CPU kernel rounds A to
int8 per block of K (steps of max|a| / 127) and accumulates in integers. The engine stays in float, as for
the QDQ format's fused kernels. Measured on the optimised test ViT (1,000 inputs): in float the logits are
up to 0.087 from onnxruntime's as deployed (scale 7.5), labels 99.7 % equal; emulating the rounding was
exact for one layer (1e-6) but not through eight (LayerNormalization outputs an ulp apart land values on
the other side of a half step): max 0.015, with 34 inputs beyond 1e-4 of the scale, close to the parity
check's 5 % allowance. The parity check before writing runs the file's copy at accuracy_level 0
(`surgery._in_float`).
"""
from __future__ import annotations

import numpy as np

from ..ir import NBitsParam
from ..quantization import unpack_bits
from .registry import is_static, register, static_array, xp

MS = "com.microsoft"


NBITS = (2, 4, 8)  # the bit widths onnxruntime's kernel takes


def nbits_scales_and_zeros(scales, zero_points, n: int, blocks: int,
                           bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per row and block [N, blocks]: the scales, and the zero points unpacked (2^(bits - 1) when absent)."""
    scale = np.asarray(scales, np.float32).reshape(n, blocks)
    if zero_points is None:
        return scale, np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    zero = np.asarray(zero_points)
    if zero.dtype == np.uint8:  # packed: 8 / bits per byte along the blocks, each row padded to whole bytes
        return scale, unpack_bits(zero.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    return scale, zero.astype(np.float32).reshape(n, blocks)


def nbits_param(name: str, packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int,
                block_size: int, bits: int = 4) -> NBitsParam:
    """How the packed B of a MatMulNBits maps to its float [K, N] weight and back."""
    n = np.shape(packed)[0]
    return NBitsParam(name, scale, zero, 0, np.dtype(np.uint8), block_size, k=k,
                      padded=unpack_bits(np.asarray(packed, np.uint8).reshape(n, -1), bits), bits=bits)


@register("MatMulNBits", static_inputs=(2, 3, 4), domain=MS)
def matmul_nbits(inputs, attrs, ctx):
    from ..errors import BadInputError

    k, n, bits, block_size = (int(attrs[name]) for name in ("K", "N", "bits", "block_size"))
    if bits not in NBITS or (len(inputs) > 4 and inputs[4] is not None):
        raise BadInputError(f"node {ctx.node_name!r} (MatMulNBits): only 2-, 4- and 8-bit weights without g_idx "
                            f"are supported (bits={bits})")
    a, b = inputs[0], inputs[1]
    if is_static(b) and np.asarray(b).dtype == np.uint8:  # not folded: unpack here
        scale, zero = nbits_scales_and_zeros(static_array(inputs[2], "the MatMulNBits scales", ctx),
                                             inputs[3] if len(inputs) > 3 else None, n, -(-k // block_size), bits)
        b = nbits_param(ctx.node_name, b, scale, zero, k, block_size, bits).dequantize(b)
    y = xp(a, b).matmul(a, b)
    bias = inputs[5] if len(inputs) > 5 else None
    return y if bias is None else y + bias
