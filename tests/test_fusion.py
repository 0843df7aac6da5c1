"""Vector fields stacked from more than 8 components: the select-chain rewrite gives the
same values and derivatives, and leaves no concatenation in a step loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibrate as cal
from calibrate._fusion import fuse_components


@jax.jit
def _stacked_by_a_helper(a, b):
    # jnp.array of scalars is a concatenate of one-element pieces, inside a jit.
    return jnp.array([a * b, a - b, a / b, jnp.sin(a), b**2, a + 1, b - 1, a * a, b * b, a])


def _field(x, p):
    """12 components with a custom derivative rule and a branch, 10 more from a jitted
    helper, and 40 in one stack (selected in two groups)."""
    a, b, c = x[0], x[1], x[2]
    main = jnp.stack([
        p * a * b, -a + c, jax.nn.softplus(b - c), jax.lax.cond(a > 0, jnp.exp, jnp.cos, c),
        a, b, c, a * c, jnp.tanh(b), p, -p * c, a + b + c,
    ])
    wide = jnp.stack([jnp.sin(i * a + b) * p for i in range(40)])
    return jnp.concatenate([main, _stacked_by_a_helper(a, b + 2.0), wide])


_fused_field = fuse_components(_field)


def test_same_values_derivatives_and_batches():
    x, p = jnp.array([0.3, -1.2, 0.7]), jnp.asarray(1.7)
    np.testing.assert_allclose(jax.jit(_fused_field)(x, p), jax.jit(_field)(x, p), rtol=1e-15)
    for transform in (jax.jacfwd, jax.jacrev):
        for argnum in (0, 1):
            np.testing.assert_allclose(jax.jit(transform(_fused_field, argnum))(x, p),
                                       jax.jit(transform(_field, argnum))(x, p), rtol=1e-14)
    xs = jax.random.normal(jax.random.key(0), (5, 3))
    np.testing.assert_allclose(jax.jit(jax.vmap(_fused_field, (0, None)))(xs, p),
                               jax.jit(jax.vmap(_field, (0, None)))(xs, p), rtol=1e-14)
    branch = jnp.array([-0.3, -1.2, 0.7])  # the other side of the cond
    np.testing.assert_allclose(jax.jit(jax.grad(lambda x: _fused_field(x, p).sum()))(branch),
                               jax.jit(jax.grad(lambda x: _field(x, p).sum()))(branch),
                               rtol=1e-14)


def _loop_body_concatenates(vector_field, y0):
    """Concatenations inside the while loop of 50 explicit Euler steps, compiled."""
    def euler(y0):
        return jax.lax.fori_loop(0, 50, lambda i, y: y + 1e-3 * vector_field(y), y0)

    hlo = jax.jit(euler).lower(y0).compile().as_text()
    body = re.search(r"body=%?([\w.\-]+)", hlo).group(1)
    computation = re.search(rf"\n%?{re.escape(body)} [^\n]*\{{\n(.*?)\n\}}", hlo, re.S)
    return computation.group(1).count(" concatenate(")


@pytest.mark.parametrize("fused", [False, True])
def test_the_cascade_vector_field_leaves_no_concatenation_in_a_step_loop(zoo, fused):
    cascade = zoo["mapk_cascade"]
    model = cascade.MODEL()
    params = {k: jnp.asarray(v, float) for k, v in
              model.parameter_space.complete(cascade.TRUE_PARAMETERS).items()}
    args = (params, {"L": cal.Constant(1.0)})
    y0 = model.initial_state(params)
    if fused:
        # What diffrax calls: every model's vector field is fused.
        field = lambda y: model.vector_field(0.0, y, args)  # noqa: E731
    else:
        field = lambda y: model.rhs(0.0, y, params, {"L": jnp.asarray(1.0)})  # noqa: E731
    count = _loop_body_concatenates(field, y0)
    assert (count == 0) if fused else (count >= 1), count
