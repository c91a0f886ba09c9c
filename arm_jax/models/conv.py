"""NHWC/HWIO convolutions in the forms XLA:CPU runs fastest (`cpu_conv`), and the plain one.

These forms are for programs compiled for the CPU only: `per_platform.conv` picks
`cpu_conv` there and `plain_conv` elsewhere.

XLA computes the input gradient of a stride-s convolution as one convolution
over the output gradient dilated with s-1 zeros between pixels, and on CPU that
runs ~4x slower than the forward conv (measured on ResNet-18's 3x3 stride-2
convs). The polyphase form computes the same sums without the zeros: input
pixel s*q + a only meets the kernel taps i = a + pad (mod s), so each of the s*s
phases of the input gradient is a small stride-1 convolution of the output
gradient with those taps, and the phases are interleaved back. The 1x1 stride-s
projection's filter gradient is a plain matrix product. Forward passes are unchanged.
Float64 convolutions, which XLA:CPU runs in a slow generic loop, are written as one matrix
product of the stacked kernel-tap windows (`tap_matmul_conv`), and so are convolutions over
maps of at most 2x2 pixels (`patches_matmul_conv`).
On the CPU each convolution's input passes through `materialized`, so that its filter
gradient transposes a stored copy instead of recomputing the input inside the transpose.
"""

from functools import partial

import jax
import jax.numpy as jnp

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def materialized(x: jax.Array) -> jax.Array:
    """`x`, held behind an optimization barrier: XLA computes it once and every user reads that copy.

    Why: XLA:CPU's filter gradient of an NHWC conv reads its input transposed to
    (C, H, W, N). Without the barrier XLA fuses the input's producers (BatchNorm, the residual
    add, ReLU) into that transpose and recomputes them there, reading each operand with a stride
    of H*W*C floats: measured in the 112 px training step, 30 ms for one 6.4 MB activation
    against 3 ms for the plain transpose. The barrier only holds when the step is compiled with
    xla_flags.training_compiler_options() (XLA otherwise removes barriers before fusing), and it
    changes no value: the gradients come out bitwise the same.
    """
    return jax.lax.optimization_barrier(x)


def cpu_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`plain_conv`, written in the form XLA:CPU runs fastest for this dtype and map size."""
    if x.dtype == jnp.float64:
        # XLA:CPU has no library kernel for float64 convolutions (measured ~50x slower than
        # float32); float64 checks (parity, multi-device equality) would spend minutes here.
        return tap_matmul_conv(x, kernel, stride, padding)
    if _tiny_map(x, kernel.shape[0]):
        return patches_matmul_conv(x, kernel, stride, padding)
    x = materialized(x)  # its filter gradient then transposes a stored copy
    if stride > 1 and x.shape[1] >= 48:
        # Measured on 2 cores: its gradients are faster on maps of 56 px (layer2_0 at 224), not 28 px.
        return strided_conv(x, kernel, stride, padding)
    return plain_conv(x, kernel, stride, padding)


def _tiny_map(x: jax.Array, kernel_size: int) -> bool:
    """XLA:CPU runs a 3x3 conv on a 2x2 map at ~1 GFLOP/s (70 elsewhere); layer4 hits it for 33-64 px inputs."""
    return kernel_size > 1 and x.shape[1] * x.shape[2] <= 4 and x.shape[-1] >= 128


def patches_matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`plain_conv` as patches @ kernel (im2col): 40x faster for XLA:CPU's tiny-map case."""
    k, _, in_channels, out_channels = kernel.shape
    pads = ((padding, padding), (padding, padding))
    patches = jax.lax.conv_general_dilated_patches(
        x, (k, k), (stride, stride), pads, dimension_numbers=DIMENSIONS
    )  # (N, h, w, C*k*k), channel-major: index c*k*k + i*k + j
    return patches @ kernel.transpose(2, 0, 1, 3).reshape(in_channels * k * k, out_channels)


def plain_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Square stride, symmetric zero padding: PyTorch's Conv2d(bias=False) in NHWC."""
    pads = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=DIMENSIONS)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`plain_conv` with the polyphase input gradient (1x1 kernels: the filter gradient as a matmul)."""
    return plain_conv(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
    return plain_conv(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, residuals, grad):
    x, kernel = residuals
    if kernel.shape[:2] == (1, 1) and padding == 0:
        # XLA's own input gradient is as fast as a matmul + scatter here (measured); its filter gradient is not.
        (input_grad,) = jax.vjp(lambda x: plain_conv(x, kernel, stride, padding), x)[1](grad)
        kernel_grad = jnp.einsum("nhwc,nhwo->co", x[:, ::stride, ::stride, :], grad)[None, None]
        return input_grad, kernel_grad.astype(kernel.dtype)
    (kernel_grad,) = jax.vjp(lambda k: plain_conv(x, k, stride, padding), kernel)[1](grad)
    return polyphase_input_grad(grad, kernel, stride, padding, x.shape), kernel_grad


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def tap_matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`plain_conv` as one matrix product: the k*k strided input windows side by side @ the kernel.

    XLA:CPU runs float64 convolutions in a generic loop, ~50x slower than float32 ones (Eigen's
    convolution kernels are float32/float16 only), but float64 matrix products in Eigen's fast
    GEMM; slices and a concatenation differentiate into pads and sums, so the gradients are fast
    too. Measured on the 40 px ARM-ResNet-18 in float64, batch 8: the training gradient 12.8 s ->
    0.33 s, its compilation 24 s -> 17 s (one product per conv; a product per tap compiled in 40 s).
    """
    k, _, in_channels, out_channels = kernel.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    patches = jnp.concatenate(window_taps(padded, k, stride), axis=-1)  # (N, h, w, k*k*C), tap-major like HWIO
    return patches @ kernel.reshape(k * k * in_channels, out_channels)


def window_taps(padded: jax.Array, window: int, stride: int) -> list[jax.Array]:
    """The window*window taps of a padded NHWC map, row-major: tap (i, j) holds, for every
    output pixel of a window x window, stride-`stride` sweep, its window's element (i, j)."""
    out_h = (padded.shape[1] - window) // stride + 1
    out_w = (padded.shape[2] - window) // stride + 1
    return [padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(window) for j in range(window)]


def _phase_taps(phase: int, stride: int, padding: int, kernel_size: int, in_size: int, out_size: int):
    """For input pixels s*q + phase: (first tap, tap count, pad before, pad after, count of q)."""
    first = (phase + padding) % stride
    taps = max(0, -(-(kernel_size - first) // stride))
    offset = (phase + padding - first) // stride  # grad index of tap `first` for q = 0
    count = -(-(in_size - phase) // stride)
    before = taps - 1 - offset
    after = count + taps - 1 - out_size - before
    return first, taps, before, after, count


def polyphase_input_grad(grad, kernel, stride: int, padding: int, input_shape) -> jax.Array:
    """d(plain_conv)/dx applied to `grad`, as s*s stride-1 convolutions interleaved (no dilated zeros)."""
    n, height, width, channels = input_shape
    kernel_size = kernel.shape[0]
    side = -(-max(height, width) // stride)  # phases padded to a common side, cropped after interleaving
    rows = []
    for row_phase in range(stride):
        r0, r_taps, r_before, r_after, r_count = _phase_taps(
            row_phase, stride, padding, kernel_size, height, grad.shape[1])
        row = []
        for col_phase in range(stride):
            c0, c_taps, c_before, c_after, c_count = _phase_taps(
                col_phase, stride, padding, kernel_size, width, grad.shape[2])
            if r_taps == 0 or c_taps == 0:
                phase = jnp.zeros((n, r_count, c_count, channels), grad.dtype)
            else:
                # Taps of this phase, flipped (a correlation over grad) and with in/out channels swapped.
                sub = kernel[r0::stride, c0::stride][::-1, ::-1].transpose(0, 1, 3, 2)
                padded = jax.lax.pad(grad, jnp.zeros((), grad.dtype),
                                     ((0, 0, 0), (r_before, r_after, 0), (c_before, c_after, 0), (0, 0, 0)))
                phase = jax.lax.conv_general_dilated(padded, sub, (1, 1), "VALID", dimension_numbers=DIMENSIONS)
            row.append(jnp.pad(phase, ((0, 0), (0, side - r_count), (0, side - c_count), (0, 0))))
        rows.append(jnp.stack(row, axis=3))  # (N, side, side, s_col, C)
    interleaved = jnp.stack(rows, axis=2)  # (N, side, s_row, side, s_col, C)
    interleaved = interleaved.reshape(n, side * stride, side * stride, channels)
    return interleaved[:, :height, :width, :].astype(grad.dtype)

