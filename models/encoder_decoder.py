"""The encoder-decoder Transformer (Vaswani et al. 2017) on the shared stacks.

    e_x    = E[x] · sqrt(D) + PE(positions_x)          dropout; E shared by both sides
    h      = Encoder(e_x)                               bidirectional, within a segment
    e_y    = E[y_shifted] · sqrt(D) + PE(positions_y)   targets shifted right, BOS first
    s      = Decoder(e_y, h)                            causal self-attention, then
                                                        cross-attention to h
    logits = s Eᵀ                                       the output projection is E too

Post-LN as in the paper (`norm_position='post'`), pre-LN as an option; sinusoidal positions
by default, any scheme by name (`position`: learned tables are the encoder's and the
decoder's own; schemes inside attention act on self-attention only). One joint vocabulary:
source, target and output embeddings share one table (`share_embeddings`, `tie_output`).

Packed rows: each side has its own segment ids (1, 2, ...; 0 = padding) and positions;
target segment k attends to source segment k only.

Decoding (`decode=True` on `decode`) runs over a 'cache' collection: created by `init`
with a dummy `[B, max_len]` decoder input and the encoding (models/seq2seq_decoding.py
does this), primed by a first call that passes the encoding — each cross-attention layer
caches the source's keys and values then, once per source — and stepped by calls with
`encoded=None`. Dims as in attention.py, plus V (vocabulary).
"""

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import layers
from models import transformer

Array = jax.Array
Encoded = dict[str, Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderStackConfig(transformer.TransformerConfig):
  """The encoder's stack: the shared settings with a mask that sees both directions."""
  causal: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderDecoderConfig(transformer.TransformerConfig):
  """The model's hyperparameters; the stack fields (`mask` is the decoder's) are shared by
  both stacks, which differ in depth (`num_decoder_layers`) and mask only."""
  vocab_size: int
  max_len: int                   # the longest row of either side (learned positions)
  num_decoder_layers: int = 0    # 0: as many as the encoder (`num_layers`)
  encoder_mask: str = 'bidirectional'
  share_embeddings: bool = True  # one token table for source and target (joint vocabulary)
  tie_output: bool = True        # the output projection is the target token table
  # Vaswani et al. sec. 3.4: embeddings × sqrt(D). Their table then starts at N(0, 1/D), so
  # the scaled embeddings are about unit size, as the unit sinusoids added to them.
  scale_embeddings: bool = True
  # BART: a norm over each side's embeddings (tokens + positions), before dropout.
  embed_norm: bool = False
  # T5 v1.0: the tied projection reads the decoder's output × D^-1/2 (its table starts at
  # N(0, 1) and is not scaled on input, so the logits would otherwise grow as sqrt(D)).
  scale_tied_output: bool = False

  def __post_init__(self):
    for name in ('vocab_size', 'max_len'):
      self._check_positive_int(name)
    if self.num_decoder_layers:
      self._check_positive_int('num_decoder_layers')
    if self.scale_tied_output and not self.tie_output:
      self._fail('scale_tied_output=True scales the tied output projection; it needs '
                 f'{self._name("tie_output")}=True')
    super().__post_init__()
    try:
      self.encoder_stack  # pylint: disable=pointless-statement
    except ValueError as e:  # 'EncoderStackConfig.mask=...' names our field encoder_mask.
      self._fail(str(e).replace('EncoderStackConfig.mask', 'encoder_mask', 1))

  def _stack_fields(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name)
            for f in dataclasses.fields(transformer.TransformerConfig)}

  @property
  def encoder_stack(self) -> EncoderStackConfig:
    return EncoderStackConfig(**{**self._stack_fields(), 'mask': self.encoder_mask})

  @property
  def decoder_stack(self) -> transformer.TransformerConfig:
    return transformer.TransformerConfig(
        **{**self._stack_fields(), 'num_layers': self.num_decoder_layers or self.num_layers})

  @property
  def embed_init_stddev(self) -> float:
    return self.embed_dim ** -0.5 if self.scale_embeddings else self.init_stddev


def _embed(module: nn.Module, cfg: EncoderDecoderConfig, table: layers.Embed,
           tokens_BT: Array, positions_BT: Array, deterministic: bool) -> Array:
  """E[tokens] (× sqrt(D)) + the scheme's position embeddings (in `module`'s scope), dropout."""
  x_BTD = table(tokens_BT)
  if cfg.scale_embeddings:
    x_BTD = x_BTD * math.sqrt(cfg.embed_dim)
  position_BTD = cfg.position_scheme.embed(
      positions_BT, max_len=cfg.max_len, features=cfg.embed_dim, dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype)
  if position_BTD is not None:
    x_BTD = x_BTD + position_BTD
  if cfg.embed_norm:
    x_BTD = layers.NORMS[cfg.norm](
        epsilon=cfg.norm_epsilon, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype, name='ln_embed')(x_BTD)
  return nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)


class SourceEncoder(nn.Module):
  """Embeds the source and encodes it: `[B, S, D]`."""
  config: EncoderDecoderConfig
  table: layers.Embed

  @nn.compact
  def __call__(self, tokens_BS: Array, segment_ids_BS: Array, positions_BS: Array,
               deterministic: bool) -> Array:
    x_BSD = _embed(self, self.config, self.table, tokens_BS, positions_BS, deterministic)
    return transformer.Encoder(self.config.encoder_stack, name='stack')(
        x_BSD, segment_ids_BT=segment_ids_BS, positions_BT=positions_BS,
        deterministic=deterministic).hidden_BTD


class TargetDecoder(nn.Module):
  """Embeds the (shifted) targets, decodes them against the encoding: float32 logits."""
  config: EncoderDecoderConfig
  table: layers.Embed

  @nn.compact
  def __call__(self, tokens_BT: Array, encoded_BSD: Array | None,
               source_segment_ids_BS: Array | None, segment_ids_BT: Array | None,
               positions_BT: Array | None, deterministic: bool, decode: bool) -> Array:
    cfg = self.config
    batch_size, length = tokens_BT.shape
    slots_BT = transformer.next_positions(self, batch_size, length, decode)
    positions_BT = slots_BT if positions_BT is None else positions_BT
    key_positions_BS = transformer.key_positions(self, positions_BT, slots_BT, decode)
    if decode:
      # The source's segment ids mask cross-attention at every step: kept from the first.
      if source_segment_ids_BS is not None:
        self.put_variable('cache', 'source_segment_ids', source_segment_ids_BS)
      else:
        source_segment_ids_BS = self.get_variable('cache', 'source_segment_ids')
    x_BTD = _embed(self, cfg, self.table, tokens_BT, positions_BT, deterministic)
    y_BTD = transformer.Decoder(cfg.decoder_stack, cross_attention=True, name='stack')(
        x_BTD, positions_BT=positions_BT, key_positions_BS=key_positions_BS,
        segment_ids_BT=segment_ids_BT, encoded_BSD=encoded_BSD,
        encoder_segment_ids_BS=source_segment_ids_BS, deterministic=deterministic,
        decode=decode).hidden_BTD
    if cfg.tie_output:
      if cfg.scale_tied_output:
        y_BTD = y_BTD * cfg.embed_dim ** -0.5
      return self.table.attend(y_BTD)
    logits_BTV = nn.DenseGeneral(
        cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_stddev),
                                                 ('embed', 'vocab')),
        name='output')(y_BTD)
    return logits_BTV.astype(jnp.float32)


def _default_ids(tokens_BT: Array, segment_ids_BT: Array | None,
                 positions_BT: Array | None) -> tuple[Array, Array]:
  """One segment per row, positions 0..T-1, where not given."""
  batch_size, length = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((batch_size, length), jnp.int32)
  if positions_BT is None:
    positions_BT = attention.sequence_index(batch_size, length)
  return segment_ids_BT, positions_BT


class EncoderDecoder(nn.Module):
  """`encode` the source once, `decode` the targets against it; `__call__` does both
  (teacher forcing). The seq2seq protocol of models/seq2seq_decoding.py."""
  config: EncoderDecoderConfig
  # The decode cache's leaves that depend on the source only (beam search never
  # reorders them).
  source_cache: ClassVar[frozenset[str]] = frozenset(
      {'source_key', 'source_value', 'source_segment_ids'})

  def setup(self):
    cfg = self.config
    embed = lambda: layers.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        embedding_init=nn.initializers.normal(cfg.embed_init_stddev))
    self.token_embed = embed()
    self.target_token_embed = self.token_embed if cfg.share_embeddings else embed()
    self.encoder = SourceEncoder(cfg, self.token_embed)
    self.decoder = TargetDecoder(cfg, self.target_token_embed)

  def encode(self, inputs_BS: Array, *, segment_ids_BS: Array | None = None,
             positions_BS: Array | None = None, deterministic: bool = True) -> Encoded:
    """{'hidden': [B, S, D], 'segment_ids': [B, S]}: what the decoder reads of the source."""
    segment_ids_BS, positions_BS = _default_ids(inputs_BS, segment_ids_BS, positions_BS)
    hidden_BSD = self.encoder(inputs_BS, segment_ids_BS, positions_BS, deterministic)
    return {'hidden': hidden_BSD, 'segment_ids': segment_ids_BS}

  def decode(self, decoder_inputs_BT: Array, encoded: Encoded | None, *,
             segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
             deterministic: bool = True, decode: bool = False) -> Array:
    """Logits `[B, T, V]` (float32) of each next target token.

    `encoded` is `encode`'s output; in decode mode only on the first call (None after: the
    cache holds what the steps need). `positions_BT` None: 0..T-1, or in decode mode the
    next positions of the cache.
    """
    if encoded is None and not decode:
      raise ValueError('decode() needs the encoding outside decode mode')
    hidden_BSD = None if encoded is None else encoded['hidden']
    source_segment_ids_BS = None if encoded is None else encoded['segment_ids']
    return self.decoder(decoder_inputs_BT, hidden_BSD, source_segment_ids_BS, segment_ids_BT,
                        positions_BT, deterministic, decode)

  def __call__(self, inputs_BS: Array, decoder_inputs_BT: Array | None = None, *,
               inputs_segment_ids_BS: Array | None = None,
               inputs_positions_BS: Array | None = None,
               targets_segment_ids_BT: Array | None = None,
               targets_positions_BT: Array | None = None,
               deterministic: bool = True) -> Array:
    """Teacher forcing: logits `[B, T, V]` (float32) for the targets.

    `decoder_inputs_BT` are the targets shifted right within each segment, BOS first;
    None decodes the inputs themselves (so `init(rng, inputs)` works as for any family).
    """
    encoded = self.encode(inputs_BS, segment_ids_BS=inputs_segment_ids_BS,
                          positions_BS=inputs_positions_BS, deterministic=deterministic)
    if decoder_inputs_BT is None:
      decoder_inputs_BT = inputs_BS
    return self.decode(decoder_inputs_BT, encoded, segment_ids_BT=targets_segment_ids_BT,
                       positions_BT=targets_positions_BT, deterministic=deterministic)
