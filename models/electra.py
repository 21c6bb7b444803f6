"""ELECTRA (Clark et al. 2020): a small MLM generator and a discriminator, two BERT encoders
sharing one embedding module.

    e        = Embeddings(x)                         token, position, type embeddings + LN [E]
    G(x̃)     = BERT_g(e(x̃))  -> p_G(x_t | x̃)         the generator: MLM over the masked x̃
    x̂_t      ~ p_G(· | x̃)  at masked t, else x_t     replaced tokens (objectives/electra.py)
    D(x̂)_t   = w · act(W h_t + b) + c                is token t original (< 0) or replaced (> 0)?

The generator is `generator_fraction` of the discriminator's width (its embed_dim, mlp_dim
and heads; the head size stays the discriminator's, as in Google's code), with as many
layers. Both read the same embeddings of width E (`embedding_size`, default the
discriminator's width), each projecting E to its own width where they differ; the
generator's MLM head maps back to E and scores against the shared token table.

Parameters: 'embeddings' (shared), 'generator' and 'discriminator' (BERT trees without
their own embeddings), 'rtd_dense' and 'rtd_out' (the discriminator's head). Only the
discriminator is kept for fine-tuning: `discriminator_params` gives it as a plain BERT's
tree, which `BertClassifier` (configs/bert_finetune.py) takes unchanged.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import bert
from models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElectraConfig(bert.BertConfig):
  """The discriminator's hyperparameters (a BertConfig) and the generator's size.

  The generator is the discriminator scaled by `generator_fraction` in width (embed_dim,
  mlp_dim, heads); `generator_num_layers` 0 keeps the discriminator's depth.
  """
  generator_fraction: float = 0.25
  generator_num_layers: int = 0
  next_sentence: bool = False  # ELECTRA has no NSP

  def __post_init__(self):
    if self.next_sentence:
      self._fail('next_sentence must be False: ELECTRA trains no NSP head')
    if not 0.0 < self.generator_fraction <= 1.0:
      self._fail(f'generator_fraction must lie in (0, 1], got {self.generator_fraction!r}')
    if self.generator_num_layers:
      self._check_positive_int('generator_num_layers')
    super().__post_init__()
    width = self.embed_dim * self.generator_fraction
    if abs(width - round(width)) > 1e-6 or round(width) % self.generator_heads:
      self._fail(f'generator_fraction={self.generator_fraction} of embed_dim={self.embed_dim} '
                 f'gives a generator width {width} that is not a whole multiple of its '
                 f'{self.generator_heads} heads')

  @property
  def generator_heads(self) -> int:
    return max(1, int(self.num_heads * self.generator_fraction + 1e-6))

  def _encoder(self, **changes) -> bert.BertConfig:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(bert.BertConfig)}
    return bert.BertConfig(**{**fields, 'embedding_size': self.embedding_width,
                              'next_sentence': False, **changes})

  @property
  def discriminator(self) -> bert.BertConfig:
    """The discriminator as a plain BERT (no MLM head): what fine-tuning starts from."""
    return self._encoder(mlm_head=False)

  @property
  def generator(self) -> bert.BertConfig:
    """The generator: a narrower BERT (with its MLM head) over the same embeddings."""
    f = self.generator_fraction
    # round(): a fraction such as 1/3 (ELECTRA-Base's generator) is not exact in binary.
    return self._encoder(embed_dim=round(self.embed_dim * f),
                         mlp_dim=max(1, round(self.mlp_dim * f)),
                         num_heads=self.generator_heads,
                         num_layers=self.generator_num_layers or self.num_layers)


class Electra(nn.Module):
  """Generator and discriminator over shared embeddings.

  `generate` gives the generator's outputs ('mlm_logits' [B, T, V] float32, 'hidden');
  `discriminate` the discriminator's ('rtd_logits' [B, T] float32: > 0 says replaced,
  'hidden', 'pooled'); `__call__` runs both on the same tokens (for init, and for a look
  at both) and returns the discriminator's outputs with the generator's 'mlm_logits'.
  """
  config: ElectraConfig

  def setup(self):
    cfg = self.config
    self.embeddings = bert.Embeddings(cfg.discriminator)
    self.generator = bert.BERT(cfg.generator, embeddings=self.embeddings)
    self.discriminator = bert.BERT(cfg.discriminator, embeddings=self.embeddings)
    dense = lambda features, out_axis, name: nn.Dense(
        features, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_stddev),
                                                 ('embed', out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)), name=name)
    self.rtd_dense = dense(cfg.embed_dim, 'mlp', 'rtd_dense')
    self.rtd_out = dense(1, 'classes', 'rtd_out')

  def generate(self, tokens_BT: Array, **kwargs) -> dict[str, Array]:
    """The generator's MLM outputs on (masked) `tokens_BT`; kwargs as `BERT`'s."""
    return self.generator(tokens_BT, **kwargs)

  def discriminate(self, tokens_BT: Array, **kwargs) -> dict[str, Array]:
    """The discriminator's outputs and its per-token logit of "replaced"."""
    outputs = self.discriminator(tokens_BT, **kwargs)
    h_BTD = layers.activation(self.config.activation)(self.rtd_dense(outputs['hidden']))
    return {**outputs, 'rtd_logits': self.rtd_out(h_BTD)[..., 0].astype(jnp.float32)}

  def __call__(self, tokens_BT: Array, **kwargs) -> dict[str, Array]:
    generated = self.generate(tokens_BT, **kwargs)
    return {**self.discriminate(tokens_BT, **kwargs), 'mlm_logits': generated['mlm_logits']}


def discriminator_params(params: dict[str, Any]) -> dict[str, Any]:
  """The discriminator's parameters as a plain BERT's tree (embeddings at its top level):
  what a `BertClassifier` fine-tunes. The generator and the RTD head are dropped."""
  return {**params['embeddings'], **params['discriminator']}
