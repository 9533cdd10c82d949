"""LSTM, GRU and RNN: one `lax.scan` over time per direction.

The input projection X·Wᵀ (+ both biases) of every time step is one matmul before the scan; only the
recurrent product H·Rᵀ runs inside it. Not unrolled: unrolling the zoo's 28-step LSTM took its forward
from 3.4x to 1.9x onnxruntime's time but a repair from 10.5 to 36.2 s (compiling the search's and
fine-tuning's programs; benchmarks/results/forward-lstm.json has the scan's figures).

Gate order and equations are the ONNX spec's (LSTM: i, o, f, c with optional peepholes P and coupled
input/forget; GRU: z, r, h with `linear_before_reset`, as PyTorch exports it). `sequence_lens`, when given, masks the steps past each sequence's end: the state stays as it
was (so a reverse pass starts at the sequence's last element) and Y is zero there, as onnxruntime does.
`layout` 1 (batch first) is transposed in and out. `clip` bounds the gates' pre-activations.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from .registry import OpContext, register

# name -> (function of (x, alpha, beta), default alpha, default beta); None: the function takes no parameter
_ACTIVATIONS: dict[str, tuple[Callable[[Any, float, float], Any], float | None, float | None]] = {
    "sigmoid": (lambda x, a, b: 1.0 / (1.0 + jnp.exp(-x)), None, None),
    "tanh": (lambda x, a, b: jnp.tanh(x), None, None),
    "relu": (lambda x, a, b: jnp.maximum(x, 0.0), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: jnp.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: jnp.where(x > a, x, 0.0), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * jnp.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: jnp.clip(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: jnp.where(x >= 0, x, a * (jnp.exp(x) - 1.0)), 1.0, None),
    "softsign": (lambda x, a, b: x / (1.0 + jnp.abs(x)), None, None),
    "softplus": (lambda x, a, b: jnp.logaddexp(x, 0.0), None, None),
}


def _activations(attrs: dict, defaults: tuple[str, ...], directions: int, ctx: OpContext) -> list[list[Callable]]:
    """Per direction, the gate activation functions, with `activation_alpha`/`beta` consumed in order by
    the functions that take them."""
    from ..errors import BadInputError

    names = [str(n) for n in attrs.get("activations") or defaults * directions]
    if len(names) != len(defaults) * directions:
        raise BadInputError(f"node {ctx.node_name!r}: {len(names)} activations given, "
                            f"{len(defaults) * directions} expected ({len(defaults)} per direction)")
    alphas, betas = list(attrs.get("activation_alpha") or []), list(attrs.get("activation_beta") or [])
    functions = []
    for name in names:
        entry = _ACTIVATIONS.get(name.lower())
        if entry is None:
            raise BadInputError(f"node {ctx.node_name!r}: activation {name!r} is not supported "
                                f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        fn, default_alpha, default_beta = entry
        alpha = alphas.pop(0) if default_alpha is not None and alphas else default_alpha
        beta = betas.pop(0) if default_beta is not None and betas else default_beta
        functions.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
    per = len(defaults)
    return [functions[d * per:(d + 1) * per] for d in range(directions)]


def _run(inputs: list, attrs: dict, ctx: OpContext, gates: int, defaults: tuple[str, ...], cell: Callable,
         with_cell_state: bool, project: Callable | None = None, recur: Callable | None = None):
    """Common driver: layout, directions, biases, initial states, masking; `cell(carry, projected_x_t,
    R, extras, activations) -> carry` does one step of one direction, carry = (h,) or (h, c).
    `project(x, d)` (default X·W[d]ᵀ over every step) and `recur(h, d)` (default H·R[d]ᵀ; LSTM and RNN
    cells) replace the two products of direction d (a dynamically quantized LSTM computes them in integers)."""
    from ..errors import BadInputError

    x, w, r = inputs[0], inputs[1], inputs[2]
    bias = inputs[3] if len(inputs) > 3 else None
    lengths = inputs[4] if len(inputs) > 4 else None
    initial_h = inputs[5] if len(inputs) > 5 else None
    initial_c = inputs[6] if len(inputs) > 6 and with_cell_state else None
    peepholes = inputs[7] if len(inputs) > 7 and with_cell_state else None
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise BadInputError(f"node {ctx.node_name!r}: direction {direction!r} is not one of forward, reverse, "
                            "bidirectional")
    layout = int(attrs.get("layout", 0))
    directions = 2 if direction == "bidirectional" else 1
    hidden = int(np.shape(r)[-1])
    x = jnp.asarray(x, jnp.float32)
    if layout:
        x = jnp.swapaxes(x, 0, 1)  # [T, N, I]
    steps, batch = x.shape[0], x.shape[1]
    activations = _activations(attrs, defaults, directions, ctx)
    clip = attrs.get("clip")
    if lengths is not None and isinstance(lengths, np.ndarray) and np.all(lengths == steps):
        lengths = None  # every sequence full: no masking
    if lengths is not None:
        valid = jnp.arange(steps)[:, None] < jnp.asarray(lengths)[None, :]  # [T, N]

    def state(value: Any, d: int) -> Any:
        if value is None:
            return jnp.zeros((batch, hidden), jnp.float32)
        value = jnp.asarray(value, jnp.float32)
        return value[:, d] if layout else value[d]

    ys, finals = [], []
    for d in range(directions):
        reverse = direction == "reverse" or d == 1
        projected = (project(x, d) if project is not None
                     else jnp.einsum("tni,gi->tng", x, jnp.asarray(w[d], jnp.float32)))
        recurrent_bias = None
        if bias is not None:
            b = jnp.asarray(bias[d], jnp.float32)
            projected = projected + b[: gates * hidden]
            recurrent_bias = b[gates * hidden:]
        extras = {"bias_r": recurrent_bias, "clip": clip,
                  "recur": (lambda h, r, d=d: recur(h, d)) if recur is not None else (lambda h, r: h @ r.T),
                  "peepholes": None if peepholes is None else jnp.asarray(peepholes[d], jnp.float32),
                  "input_forget": int(attrs.get("input_forget", 0)),
                  "linear_before_reset": int(attrs.get("linear_before_reset", 0))}
        rd = jnp.asarray(r[d], jnp.float32)
        carry0 = (state(initial_h, d), state(initial_c, d)) if with_cell_state else (state(initial_h, d),)

        def step(carry, slot, rd=rd, extras=extras, acts=activations[d]):
            xt, mask = slot
            new = cell(carry, xt, rd, extras, acts)
            if mask is not None:
                new = tuple(jnp.where(mask[:, None], n, c) for n, c in zip(new, carry))
                return new, jnp.where(mask[:, None], new[0], 0.0)
            return new, new[0]

        final, y = lax.scan(step, carry0, (projected, valid if lengths is not None else None), reverse=reverse)
        ys.append(y)
        finals.append(final)
    y = jnp.stack(ys, axis=1)  # [T, D, N, H]
    last = [jnp.stack([f[i] for f in finals], axis=0) for i in range(len(finals[0]))]  # [D, N, H] each
    if layout:
        y = jnp.transpose(y, (2, 0, 1, 3))
        last = [jnp.swapaxes(v, 0, 1) for v in last]
    outputs = (y, *last)
    return outputs[: max(1, ctx.num_outputs)] if ctx.num_outputs > 1 else y


def _clip(value: Any, clip: float | None) -> Any:
    return value if clip is None else jnp.clip(value, -clip, clip)


def _lstm_cell(carry, xt, r, extras, acts):
    h, c = carry
    f_act, g_act, h_act = acts
    z = xt + extras["recur"](h, r)
    if extras["bias_r"] is not None:
        z = z + extras["bias_r"]
    zi, zo, zf, zc = jnp.split(z, 4, axis=-1)
    p = extras["peepholes"]
    if p is not None:
        pi, po, pf = jnp.split(p, 3)
        zi, zf = zi + pi * c, zf + pf * c
    clip = extras["clip"]
    i = f_act(_clip(zi, clip))
    f = 1.0 - i if extras["input_forget"] else f_act(_clip(zf, clip))
    c_new = f * c + i * g_act(_clip(zc, clip))
    if p is not None:
        zo = zo + po * c_new
    o = f_act(_clip(zo, clip))
    return o * h_act(c_new), c_new


def _gru_cell(carry, xt, r, extras, acts):
    (h,) = carry
    f_act, g_act = acts
    hidden = h.shape[-1]
    bias_r = extras["bias_r"] if extras["bias_r"] is not None else jnp.zeros(3 * hidden, jnp.float32)
    xz, xr, xh = jnp.split(xt, 3, axis=-1)
    rz, rr, rh = jnp.split(r, 3, axis=0)
    bz, br, bh = jnp.split(bias_r, 3)
    clip = extras["clip"]
    z = f_act(_clip(xz + h @ rz.T + bz, clip))
    reset = f_act(_clip(xr + h @ rr.T + br, clip))
    if extras["linear_before_reset"]:
        candidate = xh + reset * (h @ rh.T + bh)
    else:
        candidate = xh + (reset * h) @ rh.T + bh
    h_tilde = g_act(_clip(candidate, clip))
    return ((1.0 - z) * h_tilde + z * h,)


def _rnn_cell(carry, xt, r, extras, acts):
    (h,) = carry
    z = xt + extras["recur"](h, r)
    if extras["bias_r"] is not None:
        z = z + extras["bias_r"]
    return (acts[0](_clip(z, extras["clip"])),)


@register("LSTM")
def lstm(inputs, attrs, ctx):
    return _run(inputs, attrs, ctx, 4, ("Sigmoid", "Tanh", "Tanh"), _lstm_cell, with_cell_state=True)


@register("GRU")
def gru(inputs, attrs, ctx):
    return _run(inputs, attrs, ctx, 3, ("Sigmoid", "Tanh"), _gru_cell, with_cell_state=False)


@register("RNN")
def rnn(inputs, attrs, ctx):
    return _run(inputs, attrs, ctx, 1, ("Tanh",), _rnn_cell, with_cell_state=False)


@register("DynamicQuantizeLSTM", static_inputs=(8, 9, 10, 11), domain="com.microsoft")
def dynamic_quantize_lstm(inputs, attrs, ctx):
    """onnxruntime's dynamically quantized LSTM (what quantize_dynamic makes of an LSTM): int8 weights
    W [directions, input, 4 hidden] and R [directions, hidden, 4 hidden] (transposed against LSTM's) with
    their scales and zero points (per direction, or per direction and gate column) in slots 8-11. Each
    product quantizes its activations over their own range first, as DynamicQuantizeLinear does: the input
    projection the whole input sequence once, the recurrent product the hidden state at every step; the
    int32 products are scaled by input scale x weight scale. Weights the loader folded into float parameters
    are divided back into integer steps and rounded (straight-through gradient)."""
    from .quantize import dynamic_quantize_linear, integer_steps

    def steps_and_scale(weight, scale, zero):
        """The weight in integer steps, zero point off, and its scale shaped [D, 1, 4H or 1]."""
        directions = np.shape(weight)[0]
        scale = np.asarray(scale, np.float32)
        scale = scale.reshape(directions, 1, -1) if scale.size > 1 else np.full((directions, 1, 1), scale.reshape(()))
        if zero is not None and np.size(zero) > 1:
            zero = np.asarray(zero).reshape(directions, 1, -1)
        return integer_steps(weight, scale, zero, 0), scale

    w_steps, w_scale = steps_and_scale(inputs[1], inputs[8], inputs[9] if len(inputs) > 9 else None)
    r_steps, r_scale = steps_and_scale(inputs[2], inputs[10], inputs[11] if len(inputs) > 11 else None)

    def quantized_product(a, steps, scale):
        q, a_scale, a_zero = dynamic_quantize_linear([a], {}, ctx)
        return jnp.matmul(q - a_zero, steps, precision=lax.Precision.HIGHEST) * (a_scale * scale)

    def project(x, d):  # the whole sequence [T, N, I] quantized together
        flat = x.reshape(-1, x.shape[-1])
        return quantized_product(flat, w_steps[d], w_scale[d]).reshape(*x.shape[:2], -1)

    def recur(h, d):
        return quantized_product(h, r_steps[d], r_scale[d])

    # `_run` reads the hidden size from R's last axis and takes W and R in LSTM's layout (unused here but for
    # their shapes: `project` and `recur` compute the products)
    standard = [inputs[0], jnp.swapaxes(w_steps, 1, 2), jnp.swapaxes(r_steps, 1, 2), *inputs[3:8]]
    return _run(standard, attrs, ctx, 4, ("Sigmoid", "Tanh", "Tanh"), _lstm_cell, with_cell_state=True,
                project=project, recur=recur)
