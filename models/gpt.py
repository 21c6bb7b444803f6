"""GPT-2 style decoder-only language model (Radford et al. 2019).

    h_0 = dropout(W_e[tokens] + W_p[positions])   or another scheme of positions.py
    h_l = h_{l-1} + Attn(LN(h_{l-1}))      causal (and within a packed document)
    h_l = h_l + Mlp(LN(h_l))
    logits = LN(h_L) W_e^T                 the output projection is the token embedding

Dims as in attention.py, plus V (vocabulary) and F (MLP width).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import layers
from models import relative
from models import transformer

Array = jax.Array

REMAT_POLICIES = transformer.REMAT_POLICIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig(transformer.TransformerConfig):
  """A GPT's hyperparameters: the shared stack's (pre-LN, tanh GELU, causal) plus its
  vocabulary and context; built from a config as `GPTConfig(**config.model)`."""
  vocab_size: int
  max_len: int

  def __post_init__(self):
    for name in ('vocab_size', 'max_len'):
      self._check_positive_int(name)
    super().__post_init__()


class GPT(nn.Module):
  """A decoder-only Transformer language model; returns float32 next-token logits."""
  config: GPTConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, *, segment_ids_BT: Array | None = None,
               positions_BT: Array | None = None, prefix_lengths_B: Array | None = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """Logits `[B, T, V]` (float32) of the token following each position.

    Args:
      tokens_BT: integer token ids.
      segment_ids_BT: packed-document ids, 0 = padding; attention stays within a
        document. None: one document per row.
      positions_BT: position ids (restarting at 0 per packed document). None: 0..T-1, or
        in decode mode the cache's next positions.
      prefix_lengths_B: with `mask='prefix_lm'`, the length of each row's prefix, read
        bidirectionally (Raffel et al. 2020). Other masks take None. In decode mode it
        counts cache slots and goes with every call, and the call that writes the prefix
        writes all of it (`decoding.generate` passes the prompts as the prefix).
      deterministic: disables dropout (pass rngs={'dropout': ...} otherwise).
      decode: run over the KV cache in the 'cache' collection (see
        `attention.MultiHeadAttention`): `init` with a `[B, S_max]` dummy input shapes it,
        then `apply(..., mutable=['cache'])` takes chunks of new tokens.
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch_size, length = tokens_BT.shape
    next_positions_BT = transformer.next_positions(self, batch_size, length, decode)
    if positions_BT is None:
      positions_BT = next_positions_BT

    embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                         name='token_embed')
    x_BTD = embed(tokens_BT)
    position_BTD = cfg.position_scheme.embed(positions_BT, max_len=cfg.max_len,
                                             features=cfg.embed_dim, dtype=dtype,
                                             param_dtype=param_dtype)
    if position_BTD is not None:
      x_BTD = x_BTD + position_BTD
    # Schemes inside attention read position ids (never slots, see relative.py), for the
    # keys from the cache when decoding.
    key_positions_BS = transformer.key_positions(self, positions_BT, next_positions_BT, decode)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)

    # The stack shares GPT's scope: its parameters keep GPT-2's flat names (block_i,
    # ln_final), and so the same initialisation and checkpoints.
    decoder = transformer.Decoder(cfg)
    nn.share_scope(self, decoder)
    x_BTD = decoder(x_BTD, positions_BT=positions_BT, key_positions_BS=key_positions_BS,
                    segment_ids_BT=segment_ids_BT, prefix_lengths_B=prefix_lengths_B,
                    deterministic=deterministic, decode=decode).hidden_BTD
    return embed.attend(x_BTD)
