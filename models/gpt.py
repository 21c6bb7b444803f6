"""GPT-2 style decoder-only language model (Radford et al. 2019).

    h_0 = dropout(W_e[tokens] + W_p[positions])   or another scheme of positions.py
    h_l = h_{l-1} + Attn(LN(h_{l-1}))      causal (and within a packed document)
    h_l = h_l + Mlp(LN(h_l))
    logits = LN(h_L) W_e^T                 the output projection is the token embedding

Dims as in attention.py, plus V (vocabulary) and F (MLP width).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import block_sparse  # pylint: disable=unused-import  (registers 'block_sparse')
from models import layers
from models import positions as positions_lib
from models import relative

Array = jax.Array


# What a rematerialised block keeps from the forward pass; the rest is recomputed.
REMAT_POLICIES = {
    'none': None,                                            # keep everything (no remat)
    'full': jax.checkpoint_policies.nothing_saveable,        # keep only the block's input
    'save_dots': jax.checkpoint_policies.checkpoint_dots,    # keep matmul outputs
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of a GPT; built from a config as `GPTConfig(**config.model)`."""
  vocab_size: int
  max_len: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'scaled_dot'
  kernel: str = 'xla'
  position: str = 'learned'
  # Settings of the positional schemes (each takes those it names, see positions.py).
  relative_window: int = 16  # shaw: the clipping distance k.
  relative_buckets: int = 32  # t5, deberta: buckets (rows of the relative table).
  relative_max_distance: int = 128  # t5, deberta: where the log-spaced buckets end.
  rope_base: float = 10000.0  # rope: the wavelengths' base.
  sinusoid_scale: float = 0.02  # sinusoidal: amplitude, the size of the token embeddings.
  # The attention mask: a name in attention.MASKS, always in its causal variant. Its
  # settings (each mask takes those it names); 'prefix_lm' takes `prefix_lengths_B`.
  mask: str = 'causal'
  window: int = 0  # sliding_window: slots each query sees, itself included.
  block_size: int = 0  # bigbird: slots per block; sliding_window: sparse tile (0: window).
  window_blocks: int = 1  # bigbird: neighbouring blocks seen on each side.
  global_blocks: int = 1  # bigbird: leading blocks every block sees.
  random_blocks: int = 1  # bigbird: random earlier blocks each block sees.
  mask_seed: int = 0  # bigbird: seed of the random blocks.
  # Memory and compile time (results are the same whichever is chosen):
  remat: str = 'none'  # recompute activations in the backward pass: none | full | save_dots
  scan_layers: bool = False  # one nn.scan over stacked layers: compile time flat in depth

  def __post_init__(self):
    for name in ('vocab_size', 'max_len', 'num_layers', 'num_heads', 'embed_dim', 'mlp_dim'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'GPTConfig.{name} must be a positive integer, got {value!r}')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'GPTConfig.num_heads={self.num_heads} must divide '
                       f'GPTConfig.embed_dim={self.embed_dim}')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'GPTConfig.dropout_rate must lie in [0, 1), got {self.dropout_rate!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        raise ValueError(f'GPTConfig.{name} must name a floating dtype such as '
                         f"'float32' or 'bfloat16', got {value!r}")
    registries = (('attention', attention.SCORES), ('kernel', attention.KERNELS),
                  ('position', positions_lib.POSITIONS), ('mask', attention.MASKS),
                  ('remat', REMAT_POLICIES))
    for name, registry in registries:
      value = getattr(self, name)
      if value not in registry:
        raise ValueError(f'GPTConfig.{name}={value!r} is not one of: '
                         f'{", ".join(sorted(registry))}')
    # Every scheme checks its settings, so a bad one fails even while another is picked.
    for name in positions_lib.POSITIONS:
      try:
        positions_lib.make(name, dataclasses.asdict(self))
      except ValueError as e:
        raise ValueError(f'GPTConfig.{e}') from e
    try:
      mask = self.mask_pattern
    except ValueError as e:  # The mask's message starts with the setting's name.
      raise ValueError(f'GPTConfig.{e}') from e
    if not mask.autoregressive:
      raise ValueError(f'GPTConfig.mask={self.mask!r} lets tokens see later ones; a GPT '
                       'needs a causal mask')

  @property
  def mask_pattern(self) -> 'attention.Mask':  # Quoted: the field `attention` shadows it.
    """The attention mask `mask` with its settings, in its causal variant."""
    return attention.make_mask(self.mask, **dataclasses.asdict(self), causal=True,
                               seed=self.mask_seed)

  @property
  def position_scheme(self) -> positions_lib.NoPositions:
    """The positional scheme `position` with its settings."""
    return positions_lib.make(self.position, dataclasses.asdict(self))

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class DecoderBlock(nn.Module):
  """One pre-LN block: LN -> causal self-attention -> residual; LN -> MLP -> residual.

  Arguments are positional so that `nn.remat` can mark the Python flags static
  (`static_argnums` counts `self`), and a block inside `nn.scan` (`scanned=True`) returns
  the scan's (carry, output) pair.
  """
  config: GPTConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, mask_B1TS: Array | None = None,
               segment_ids_BT: Array | None = None,
               position_context: relative.PositionContext | None = None,
               deterministic: bool = True, decode: bool = False):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L),
    # so the stream's variance does not grow with depth.
    residual_init = nn.initializers.normal(stddev=0.02 / math.sqrt(2 * cfg.num_layers))

    h_BTD = layers.LayerNorm(dtype=dtype, param_dtype=param_dtype, name='ln_attention')(x_BTD)
    h_BTD = attention.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype, param_dtype=param_dtype,
        dropout_rate=cfg.dropout_rate, score=cfg.attention, kernel=cfg.kernel,
        out_kernel_init=residual_init, position=cfg.position_scheme,
        mask=cfg.mask_pattern, name='attention')(
            h_BTD, mask_B1TS=mask_B1TS, segment_ids_BT=segment_ids_BT,
            position_context=position_context, deterministic=deterministic, decode=decode)
    x_BTD = x_BTD + h_BTD

    h_BTD = layers.LayerNorm(dtype=dtype, param_dtype=param_dtype, name='ln_mlp')(x_BTD)
    h_BTD = layers.Mlp(
        hidden_dim=cfg.mlp_dim, dropout_rate=cfg.dropout_rate, dtype=dtype,
        param_dtype=param_dtype, out_kernel_init=residual_init, name='mlp')(
            h_BTD, deterministic=deterministic)
    x_BTD = x_BTD + h_BTD
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return (x_BTD, None) if self.scanned else x_BTD


def _block_class(cfg: GPTConfig) -> type[nn.Module]:
  """DecoderBlock, rematerialised as `cfg.remat` says."""
  if cfg.remat == 'none':
    return DecoderBlock
  return nn.remat(DecoderBlock, policy=REMAT_POLICIES[cfg.remat],
                  prevent_cse=not cfg.scan_layers,  # scan already stops CSE across layers
                  static_argnums=(5, 6))           # deterministic, decode


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
        bidirectionally (Raffel et al. 2020); not in decode mode. Other masks take None.
      deterministic: disables dropout (pass rngs={'dropout': ...} otherwise).
      decode: run over the KV cache in the 'cache' collection (see
        `attention.MultiHeadAttention`): `init` with a `[B, S_max]` dummy input shapes it,
        then `apply(..., mutable=['cache'])` takes chunks of new tokens.
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch_size, length = tokens_BT.shape
    next_positions_BT = self._next_positions(batch_size, length, decode)
    if positions_BT is None:
      positions_BT = next_positions_BT

    embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                         name='token_embed')
    x_BTD = embed(tokens_BT)
    scheme = cfg.position_scheme
    position_BTD = scheme.embed(positions_BT, max_len=cfg.max_len, features=cfg.embed_dim,
                                dtype=dtype, param_dtype=param_dtype)
    if position_BTD is not None:
      x_BTD = x_BTD + position_BTD
    # Schemes inside attention read position ids (never slots, see relative.py), for the
    # keys from the cache when decoding; what they share is computed here, once.
    position_context = relative.PositionContext(
        positions_BT, self._key_positions(positions_BT, next_positions_BT, decode))
    position_context = position_context.replace(shared=scheme.shared(
        position_context, num_heads=cfg.num_heads, features=cfg.embed_dim,
        bidirectional=False, dtype=dtype, param_dtype=param_dtype))
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)

    # Decoding masks against the cache inside each attention layer; so it hands the
    # segment ids down instead of a mask.
    mask_B1TS = None
    if decode and prefix_lengths_B is not None:
      raise NotImplementedError('prefix-LM decoding is not supported: run the prefix in '
                                'a full forward pass')
    if not decode:
      mask_B1TS = cfg.mask_pattern(attention.sequence_index(batch_size, length),
                                   prefix_lengths_B=prefix_lengths_B)
      if segment_ids_BT is not None:
        mask_B1TS &= attention.segment_mask(segment_ids_BT)
      segment_ids_BT = None

    block_args = (mask_B1TS, segment_ids_BT, position_context, deterministic, decode)
    block = _block_class(cfg)
    if cfg.scan_layers:
      # One layer traced once, its parameters and caches stacked on a leading 'layers' axis.
      stack = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast,) * len(block_args), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = stack(cfg, scanned=True, name='blocks')(x_BTD, *block_args)
    else:
      for i in range(cfg.num_layers):
        x_BTD = block(cfg, name=f'block_{i}')(x_BTD, *block_args)

    x_BTD = layers.LayerNorm(dtype=dtype, param_dtype=param_dtype, name='ln_final')(x_BTD)
    return embed.attend(x_BTD)

  def _next_positions(self, batch_size: int, length: int, decode: bool) -> Array:
    """0..T-1; in decode mode, continues from the positions already cached."""
    if not decode:
      return attention.sequence_index(batch_size, length)
    initialized = self.has_variable('cache', 'position_index')
    index = self.variable('cache', 'position_index', lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return attention.sequence_index(batch_size, length)
    start = index.value
    index.value = start + length
    return attention.sequence_index(batch_size, length, start)

  def _key_positions(self, positions_BT: Array, slots_BT: Array, decode: bool) -> Array:
    """The keys' position ids: the queries' own, or in decode mode all cached ones `[B, S]`.

    The cache of position ids sits beside the layers' KV caches and is written at the
    same slots (`slots_BT`, from `_next_positions`), so left-padded rows keep their own.
    """
    if not decode:
      return positions_BT
    initialized = self.has_variable('cache', 'cached_positions')
    cached = self.variable('cache', 'cached_positions', jnp.zeros, positions_BT.shape,
                           jnp.int32)
    if not initialized:
      return positions_BT
    cached.value = jax.lax.dynamic_update_slice(
        cached.value, positions_BT.astype(jnp.int32), (0, slots_BT[0, 0]))
    return cached.value
