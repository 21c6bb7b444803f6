"""Building blocks shared by the model families: LayerNorm, RMSNorm, the feed-forward Mlp,
Embed.

Dims as in attention.py, plus F (feed-forward width) and V (vocabulary). Every module
computes in `dtype`, stores parameters in `param_dtype` and names parameter axes with the
shared logical vocabulary (batch, length, embed, mlp, heads, kv, vocab).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# GPT-2/BERT initialise weights from N(0, 0.02).
default_init = nn.initializers.normal(stddev=0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_BTD: Array, scale_D: Array, bias_D: Array | None, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in x's dtype.

  Its gradient is written by hand (`_layer_norm_bwd`) for the sake of XLA's fusion; the
  numbers are those of autodiff (tests/models/test_layers.py).
  """
  return _layer_norm_fwd(x_BTD, scale_D, bias_D, epsilon)[0]


def _layer_norm_fwd(x_BTD, scale_D, bias_D, epsilon):
  mean_BT1 = jnp.mean(x_BTD, axis=-1, keepdims=True)
  centered_BTD = x_BTD - mean_BT1
  std_BT1 = jnp.sqrt(jnp.mean(jnp.square(centered_BTD), axis=-1, keepdims=True) + epsilon)
  normed_BTD = centered_BTD / std_BT1
  y_BTD = normed_BTD * scale_D
  if bias_D is not None:
    y_BTD = y_BTD + bias_D
  return y_BTD, (normed_BTD, std_BT1, scale_D, bias_D is not None)


def _layer_norm_bwd(epsilon, residuals, dy_BTD):
  """dx = (g - mean(g) - x̂ · mean(g · x̂)) / std with g = dy · scale.

  The division by std (not a product with 1/std) is deliberate: XLA counts a division as
  expensive and never duplicates it into several consumers, so dx is computed once per
  LayerNorm. With a product, XLA:CPU fused the whole chain of residual-stream gradients
  from all layers above into every consumer of each one, work growing as layers²
  (docs/benchmarks.md: 21% of the GPT step's kernel time at 4 layers).
  """
  del epsilon  # In std already.
  normed_BTD, std_BT1, scale_D, has_bias = residuals
  g_BTD = dy_BTD * scale_D
  mean_g_BT1 = jnp.mean(g_BTD, axis=-1, keepdims=True)
  mean_gx_BT1 = jnp.mean(g_BTD * normed_BTD, axis=-1, keepdims=True)
  dx_BTD = (g_BTD - mean_g_BT1 - normed_BTD * mean_gx_BT1) / std_BT1
  leading = tuple(range(dy_BTD.ndim - 1))
  dscale_D = jnp.sum(dy_BTD * normed_BTD, axis=leading)
  dbias_D = jnp.sum(dy_BTD, axis=leading) if has_bias else None
  return dx_BTD, dscale_D, dbias_D


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis (Ba et al. 2016), statistics in float32.

  Attributes:
    epsilon: added to the variance (GPT-2 uses 1e-5, BERT 1e-12).
    use_bias: whether to learn a shift beside the scale.
    dtype: dtype of the output.
    param_dtype: dtype of `scale` and `bias`.
  """
  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    features = x_BTD.shape[-1]
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                         (features,), self.param_dtype)
    bias_D = None
    if self.use_bias:
      bias_D = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                          (features,), self.param_dtype).astype(jnp.float32)
    # Statistics in float32: a bfloat16 variance loses most of its digits.
    y_BTD = layer_norm(x_BTD.astype(jnp.float32), scale_D.astype(jnp.float32), bias_D,
                       self.epsilon)
    return y_BTD.astype(self.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square normalisation (Zhang & Sennrich 2019; T5): x / rms(x) * scale.

  No centring and no shift; `use_bias` is accepted so that a block can pick a norm by name.
  """
  epsilon: float = 1e-6
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    scale_D = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                         (x_BTD.shape[-1],), self.param_dtype)
    x_BTD = x_BTD.astype(jnp.float32)
    mean_square_BT1 = jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True)
    y_BTD = x_BTD * jax.lax.rsqrt(mean_square_BT1 + self.epsilon) * scale_D.astype(jnp.float32)
    return y_BTD.astype(self.dtype)


NORMS: dict[str, type[nn.Module]] = {'layer': LayerNorm, 'rms': RMSNorm}

# Activations of the MLP by name; a 'g' prefix gates it (Shazeer 2020): act(x W) * (x V).
_ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    'gelu': functools.partial(nn.gelu, approximate=False),  # BERT's exact erf GELU
    'gelu_tanh': functools.partial(nn.gelu, approximate=True),  # GPT-2's tanh approximation
    'relu': nn.relu,
    'silu': nn.silu,
}
_GATED = {'geglu': 'gelu', 'geglu_tanh': 'gelu_tanh', 'reglu': 'relu', 'swiglu': 'silu'}
ACTIVATIONS = (*_ACTIVATION_FNS, *_GATED)


def is_gated(name: str) -> bool:
  """Whether the MLP of activation `name` is gated (two input projections, GLU-style)."""
  return name in _GATED


def activation(name: str) -> Callable[[Array], Array]:
  """The elementwise function of an activation name (a gated name gives its inner one)."""
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r} (known: {", ".join(ACTIVATIONS)})')
  return _ACTIVATION_FNS[_GATED.get(name, name)]


class Mlp(nn.Module):
  """Position-wise feed-forward block: Dense D -> F, activation, Dense F -> D, dropout.

  The dropout sits on the output, where GPT-2 drops the residual branch. A gated
  activation (`geglu`, `swiglu`, ...) multiplies the activated branch by a second,
  linear projection `fc_gate` (T5 v1.1, LLaMA).

  Attributes:
    hidden_dim: F.
    activation: a name in ACTIVATIONS.
    dropout_rate: dropout on the output.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters.
    use_bias: whether both projections have biases.
    kernel_init: initializer of the first projection.
    out_kernel_init: initializer of the second projection (GPT-2 scales it by depth).
  """
  hidden_dim: int
  activation: str = 'gelu_tanh'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  kernel_init: Initializer = default_init
  out_kernel_init: Initializer = default_init

  @nn.compact
  def __call__(self, x_BTD: Array, *, deterministic: bool = True) -> Array:
    dim = x_BTD.shape[-1]
    w_in = _DenseParams(dim, self.hidden_dim, ('embed', 'mlp'), self.use_bias,
                        self.kernel_init, self.param_dtype, name='fc_in')()
    w_gate = (_DenseParams(dim, self.hidden_dim, ('embed', 'mlp'), self.use_bias,
                           self.kernel_init, self.param_dtype, name='fc_gate')()
              if self.activation in _GATED else (None, None))
    w_out = _DenseParams(self.hidden_dim, dim, ('mlp', 'embed'), self.use_bias,
                         self.out_kernel_init, self.param_dtype, name='fc_out')()
    cast = lambda w: None if w is None else w.astype(self.dtype)
    y_BTD = feed_forward(x_BTD.astype(self.dtype), *map(cast, (*w_in, *w_gate, *w_out)),
                         activation=self.activation)
    y_BTD = nn.Dropout(self.dropout_rate)(y_BTD, deterministic=deterministic)
    return nn.with_logical_constraint(y_BTD, ('batch', 'length', 'embed'))


class _DenseParams(nn.Module):
  """A dense layer's parameters, `kernel` [in, out] and `bias` [out] (None without), under
  nn.Dense's names: the Mlp applies them itself (`feed_forward`)."""
  features_in: int
  features_out: int
  axes: tuple[str, str]
  use_bias: bool
  kernel_init: Initializer
  param_dtype: Dtype

  @nn.compact
  def __call__(self) -> tuple[Array, Array | None]:
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (self.features_in, self.features_out), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        (self.features_out,), self.param_dtype)
    return kernel, bias


def _plus(x: Array, bias: Array | None) -> Array:
  return x if bias is None else x + bias


def _hidden(x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, activation):
  """(a, g, h): the pre-activation, the gate (None ungated), h = act(a) [* g]."""
  a_BTF = _plus(jnp.einsum('...d,df->...f', x_BTD, w_in_DF), b_in_F)
  h_BTF = _ACTIVATION_FNS[_GATED.get(activation, activation)](a_BTF)
  g_BTF = None
  if w_gate_DF is not None:
    g_BTF = _plus(jnp.einsum('...d,df->...f', x_BTD, w_gate_DF), b_gate_F)
    h_BTF = h_BTF * g_BTF
  return a_BTF, g_BTF, nn.with_logical_constraint(h_BTF, ('batch', 'length', 'mlp'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def feed_forward(x_BTD: Array, w_in_DF: Array, b_in_F: Array | None, w_gate_DF: Array | None,
                 b_gate_F: Array | None, w_out_FD: Array, b_out_D: Array | None,
                 activation: str) -> Array:
  """y = act(x W_in + b_in) [* (x W_gate + b_gate)] W_out + b_out, over any leading dims.

  Its gradient is written by hand: autodiff formed each weight gradient from the hidden
  gradient [B·T, F] that XLA:CPU first wrote out transposed, fused into the activation's
  backward (~25% of a T5 train step, bench/t5_speed.py's profile); here every weight
  gradient contracts the token dims of the two [.., D] / [.., F] operands as they lie.
  The numbers are autodiff's (tests/models/test_layers.py).
  """
  _, _, h_BTF = _hidden(x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, activation)
  return _plus(jnp.einsum('...f,fd->...d', h_BTF, w_out_FD), b_out_D)


def _feed_forward_fwd(x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, w_out_FD, b_out_D,
                      activation):
  a_BTF, g_BTF, h_BTF = _hidden(x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, activation)
  y_BTD = _plus(jnp.einsum('...f,fd->...d', h_BTF, w_out_FD), b_out_D)
  residuals = (x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, w_out_FD, b_out_D, a_BTF, g_BTF,
               h_BTF)
  return y_BTD, residuals


def _feed_forward_bwd(activation, residuals, dy_BTD):
  x_BTD, w_in_DF, b_in_F, w_gate_DF, b_gate_F, w_out_FD, b_out_D, a_BTF, g_BTF, h_BTF = \
      residuals
  tokens = tuple(range(dy_BTD.ndim - 1))  # the leading (batch, length) dims
  bias_grad = lambda bias, d: None if bias is None else jnp.sum(d, tokens).astype(bias.dtype)
  # Formed as [D, F] and transposed: XLA:CPU's matmul wants each operand's contracted
  # (token) dim minor, so it transposes one of them; this way the [.., D] one (4x smaller
  # than h at MLP 4D) rather than h, which it rematerialised transposed (~100 ms of an
  # ELECTRA step, bench/electra_speed.py).
  dw_out_FD = jnp.einsum('...d,...f->df', dy_BTD, h_BTF).T
  dh_BTF = jnp.einsum('...d,fd->...f', dy_BTD, w_out_FD)
  act_BTF, act_vjp = jax.vjp(_ACTIVATION_FNS[_GATED.get(activation, activation)], a_BTF)
  da_BTF, = act_vjp(dh_BTF if g_BTF is None else dh_BTF * g_BTF)
  dw_in_DF = jnp.einsum('...d,...f->df', x_BTD, da_BTF)
  dx_BTD = jnp.einsum('...f,df->...d', da_BTF, w_in_DF)
  dw_gate_DF = db_gate_F = None
  if g_BTF is not None:
    dg_BTF = dh_BTF * act_BTF
    dw_gate_DF = jnp.einsum('...d,...f->df', x_BTD, dg_BTF)
    db_gate_F = bias_grad(b_gate_F, dg_BTF)
    dx_BTD = dx_BTD + jnp.einsum('...f,df->...d', dg_BTF, w_gate_DF)
  return (dx_BTD, dw_in_DF, bias_grad(b_in_F, da_BTF), dw_gate_DF, db_gate_F, dw_out_FD,
          bias_grad(b_out_D, dy_BTD))


feed_forward.defvjp(_feed_forward_fwd, _feed_forward_bwd)


class Embed(nn.Module):
  """A token embedding table `[V, D]`; `attend` reuses it as the tied output projection.

  Attributes:
    num_embeddings: V.
    features: D.
    dtype: dtype of the embeddings returned by `__call__`.
    param_dtype: storage dtype of the table.
    embedding_init: initializer of the table.
  """
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_init

  def setup(self):
    self.embedding_VD = self.param(
        'embedding', nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids_BT: Array) -> Array:
    """Looks up `[B, T]` integer ids: `[B, T, D]` in `dtype`."""
    x_BTD = jnp.take(self.embedding_VD, ids_BT, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))

  def attend(self, x_BTD: Array) -> Array:
    """Scores `[B, T, D]` against every embedding: float32 logits `[B, T, V]`."""
    logits_BTV = tied_logits(x_BTD.astype(self.dtype), self.embedding_VD.astype(self.dtype))
    return nn.with_logical_constraint(logits_BTV, ('batch', 'length', 'vocab'))


@jax.custom_vjp
def tied_logits(x_BTD: Array, table_VD: Array) -> Array:
  """float32 logits `[B, T, V]` = x · tableᵀ, the tied output projection.

  Its gradient is written by hand for the table's share: autodiff asks for
  d_table = Σ_bt dlogits_btv x_btd in the `[V, D]` layout, and XLA:CPU met that by
  copying the `[B·T, V]` logit gradients into a transposed `[V, B·T]` buffer before the
  matmul (10% of a seq2seq train step at V = 8000). Computed as `[D, V]` and then
  transposed, only the small `[D, V]` result moves. The numbers are autodiff's
  (tests/models/test_layers.py).
  """
  return jnp.einsum('btd,vd->btv', x_BTD, table_VD, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x_BTD, table_VD):
  return tied_logits(x_BTD, table_VD), (x_BTD, table_VD)


def _tied_logits_bwd(residuals, dlogits_BTV):
  x_BTD, table_VD = residuals
  dlogits_BTV = dlogits_BTV.astype(x_BTD.dtype)
  dx_BTD = jnp.einsum('btv,vd->btd', dlogits_BTV, table_VD,
                      preferred_element_type=jnp.float32)
  dtable_DV = jnp.einsum('btd,btv->dv', x_BTD, dlogits_BTV, preferred_element_type=jnp.float32)
  return dx_BTD.astype(x_BTD.dtype), dtable_DV.T.astype(table_VD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)
