"""The shared Transformer: one block, an Encoder stack and a Decoder stack over it.

Every family is a preset of these. A family's config subclasses `TransformerConfig` (the
widths, heads, attention/mask/kernel/position and their settings, the block's norm and
activation, dtypes, remat, scan) and adds only what is its own (vocabulary, embeddings,
heads); the family's module embeds its inputs, runs a stack, and applies its heads.

    pre-LN  (GPT-2, T5):  x = x + Attn(N(x));   [x = x + Cross(N(x), enc)];   x = x + Mlp(N(x))
    post-LN (BERT, BART): x = N(x + Attn(x));   [x = N(x + Cross(x, enc))];   x = N(x + Mlp(x))

A pre-LN stack ends with a final norm; a post-LN one is already normalised. What all layers
share (a relative position bias, the position ids of the keys) is computed once by the
stack and handed to each block, also under `nn.scan`.

Dims as in attention.py, plus F (MLP width) and L (layers).
"""

import dataclasses
import math
from typing import Any, ClassVar

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
NORM_POSITIONS = ('pre', 'post')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """What every stack shares. Families subclass it (`GPTConfig`, `BertConfig`, ...).

  Errors name the family's class and the field, e.g. 'BertConfig.num_heads=5 must divide
  BertConfig.embed_dim=64'.
  """
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  # The block.
  norm_position: str = 'pre'          # pre (GPT-2, T5) | post (BERT, the 2017 Transformer)
  norm: str = 'layer'                 # layer | rms (layers.NORMS)
  norm_epsilon: float = 1e-5          # GPT-2 1e-5, BERT 1e-12, T5 1e-6
  activation: str = 'gelu_tanh'       # layers.ACTIVATIONS: gelu, gelu_tanh, relu, geglu, ...
  use_bias: bool = True               # biases of the projections and norms (T5 has none)
  init_stddev: float = 0.02           # N(0, σ) initialisation of every weight
  scale_residual_init: bool = True    # GPT-2: projections into the residual σ/sqrt(2L)
  # Attention, by name (models/attention.py, models/positions.py).
  attention: str = 'scaled_dot'
  kernel: str = 'xla'
  position: str = 'learned'
  relative_window: int = 16  # shaw: the clipping distance k.
  relative_buckets: int = 32  # t5, deberta: buckets (rows of the relative table).
  relative_max_distance: int = 128  # t5, deberta: where the log-spaced buckets end.
  rope_base: float = 10000.0  # rope: the wavelengths' base.
  sinusoid_scale: float = 0.02  # sinusoidal: amplitude, the size of the token embeddings.
  sinusoid_layout: str = 'interleaved'  # sinusoidal: interleaved | concatenated (Marian).
  # The self-attention mask: a name in attention.MASKS, in the stack's variant (causal in
  # a decoder). Its settings (each mask takes those it names).
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

  # Whether the family's self-attention is causal (a decoder) or not (an encoder).
  causal: ClassVar[bool] = True

  def __post_init__(self):
    for name in ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim'):
      self._check_positive_int(name)
    if self.embed_dim % self.num_heads:
      self._fail(f'num_heads={self.num_heads} must divide {self._name("embed_dim")}='
                 f'{self.embed_dim}')
    if not 0.0 <= self.dropout_rate < 1.0:
      self._fail(f'dropout_rate must lie in [0, 1), got {self.dropout_rate!r}')
    if not self.norm_epsilon > 0:
      self._fail(f'norm_epsilon must be positive, got {self.norm_epsilon!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        self._fail(f"{name} must name a floating dtype such as 'float32' or 'bfloat16', "
                   f'got {value!r}')
    registries = (('attention', attention.SCORES), ('kernel', attention.KERNELS),
                  ('position', positions_lib.POSITIONS), ('mask', attention.MASKS),
                  ('remat', REMAT_POLICIES), ('norm', layers.NORMS),
                  ('activation', layers.ACTIVATIONS), ('norm_position', NORM_POSITIONS))
    for name, registry in registries:
      value = getattr(self, name)
      if value not in registry:
        self._fail(f'{name}={value!r} is not one of: {", ".join(sorted(registry))}')
    # Every scheme checks its settings, so a bad one fails even while another is picked.
    for name in positions_lib.POSITIONS:
      try:
        positions_lib.make(name, dataclasses.asdict(self))
      except ValueError as e:
        self._fail(str(e))
    try:
      mask = self.mask_pattern
    except ValueError as e:  # The mask's message starts with the setting's name.
      self._fail(str(e))
    if mask.autoregressive != self.causal:
      kind = 'a causal mask' if self.causal else 'a mask that sees both directions'
      self._fail(f'mask={self.mask!r} does not fit this family, which needs {kind}')

  def _name(self, field: str) -> str:
    return f'{type(self).__name__}.{field}'

  def _fail(self, message: str):
    raise ValueError(f'{type(self).__name__}.{message}')

  def _check_positive_int(self, name: str) -> None:
    value = getattr(self, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      self._fail(f'{name} must be a positive integer, got {value!r}')

  @property
  def mask_pattern(self) -> 'attention.Mask':  # Quoted: the field `attention` shadows it.
    """The self-attention mask `mask` with its settings, causal in a decoder."""
    return attention.make_mask(self.mask, **dataclasses.asdict(self), causal=self.causal,
                               seed=self.mask_seed)

  @property
  def position_scheme(self) -> positions_lib.NoPositions:
    """The positional scheme `position` with its settings."""
    return positions_lib.make(self.position, dataclasses.asdict(self))

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


class Block(nn.Module):
  """One layer: self-attention, optional cross-attention, MLP; each with norm and residual.

  Arguments are positional so that `nn.remat` can mark the Python flags static
  (`static_argnums` counts `self`), and a block inside `nn.scan` (`scanned=True`) returns
  the scan's (carry, output) pair, the output being the layer's hidden state. In decode
  mode, a 'prefix_lm' mask's `prefix_lengths_B` (cache slots) go to the self-attention.
  """
  config: TransformerConfig
  mask: Any  # the self-attention Mask: its causal variant in a decoder
  cross_attention: bool = False
  scanned: bool = False
  emit_hidden: bool = False  # scanned: also return the output as the scan's per-layer y

  @nn.compact
  def __call__(self, x_BTD: Array, mask_B1TS: Array | None = None,
               segment_ids_BT: Array | None = None,
               position_context: relative.PositionContext | None = None,
               encoded_BSD: Array | None = None, cross_mask_B1TS: Array | None = None,
               deterministic: bool = True, decode: bool = False,
               prefix_lengths_B: Array | None = None):
    cfg = self.config
    dtype, param_dtype = cfg.compute_dtype, cfg.storage_dtype
    init = nn.initializers.normal(stddev=cfg.init_stddev)
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L),
    # so the stream's variance does not grow with depth.
    residual_init = init
    if cfg.scale_residual_init:
      residual_init = nn.initializers.normal(cfg.init_stddev / math.sqrt(2 * cfg.num_layers))
    norm = lambda name: layers.NORMS[cfg.norm](
        epsilon=cfg.norm_epsilon, use_bias=cfg.use_bias, dtype=dtype,
        param_dtype=param_dtype, name=name)

    def attention_layer(name: str, kernel: str = cfg.kernel,
                        **kwargs) -> attention.MultiHeadAttention:
      return attention.MultiHeadAttention(
          num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype,
          param_dtype=param_dtype, dropout_rate=cfg.dropout_rate, score=cfg.attention,
          kernel=kernel, use_bias=cfg.use_bias, kernel_init=init,
          out_kernel_init=residual_init, name=name, **kwargs)

    def sublayer(x_BTD, norm_name, fn):
      """x + f(N(x)) or N(x + f(x)), as `norm_position` says."""
      if cfg.norm_position == 'pre':
        return x_BTD + fn(norm(norm_name)(x_BTD))
      return norm(norm_name)(x_BTD + fn(x_BTD))

    x_BTD = sublayer(x_BTD, 'ln_attention', lambda h_BTD: attention_layer(
        'attention', position=cfg.position_scheme, mask=self.mask)(
            h_BTD, mask_B1TS=mask_B1TS, segment_ids_BT=segment_ids_BT,
            position_context=position_context, deterministic=deterministic, decode=decode,
            prefix_lengths_B=prefix_lengths_B))
    if self.cross_attention:
      # Positions enter through the self-attention alone (as in T5 and BART); cross-
      # attention sees the whole encoding, masked only by padding and segments. Decoding,
      # it caches the encoding's keys/values on the first step (`encoded_BSD` given) and
      # reads them back on the others (None).
      x_BTD = sublayer(x_BTD, 'ln_cross', lambda h_BTD: attention_layer(
          'cross_attention', kernel='xla' if cfg.kernel == 'block_sparse' else cfg.kernel,
          cross=True)(h_BTD, encoded_BSD, mask_B1TS=cross_mask_B1TS,
                      deterministic=deterministic, decode=decode))
    x_BTD = sublayer(x_BTD, 'ln_mlp', lambda h_BTD: layers.Mlp(
        hidden_dim=cfg.mlp_dim, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
        use_bias=cfg.use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
        out_kernel_init=residual_init, name='mlp')(h_BTD, deterministic=deterministic))
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    if self.scanned:
      return x_BTD, (x_BTD if self.emit_hidden else None)
    return x_BTD


def _block_class(cfg: TransformerConfig) -> type[nn.Module]:
  """Block, rematerialised as `cfg.remat` says."""
  if cfg.remat == 'none':
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                  prevent_cse=not cfg.scan_layers,  # scan already stops CSE across layers
                  static_argnums=(7, 8))           # deterministic, decode


def run_blocks(module: nn.Module, cfg: TransformerConfig, x_BTD: Array, block_args: tuple, *,
               cross_attention: bool = False,
               hidden_states: bool = False) -> tuple[Array, list[Array]]:
  """The stack's layers over `x_BTD` in `module`'s scope: the output, and with
  `hidden_states` each layer's output (else an empty list).

  Unrolled the layers are `block_0` ... `block_{L-1}`; with `scan_layers` one traced layer
  `blocks` whose parameters (and caches) carry a leading 'layers' axis.
  """
  block = _block_class(cfg)
  mask = cfg.mask_pattern
  if cfg.scan_layers:
    stack = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                    split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast,) * len(block_args), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BTD, stacked_LBTD = stack(cfg, mask, cross_attention, scanned=True,
                                emit_hidden=hidden_states, parent=module,
                                name='blocks')(x_BTD, *block_args)
    return x_BTD, (list(stacked_LBTD) if hidden_states else [])
  outputs = []
  for i in range(cfg.num_layers):
    x_BTD = block(cfg, mask, cross_attention, parent=module, name=f'block_{i}')(x_BTD, *block_args)
    outputs.append(x_BTD)
  return x_BTD, (outputs if hidden_states else [])


def final_norm(cfg: TransformerConfig, x_BTD: Array, name: str = 'ln_final') -> Array:
  """A pre-LN stack's closing norm (a post-LN stack's output is normalised already)."""
  if cfg.norm_position == 'post':
    return x_BTD
  return layers.NORMS[cfg.norm](epsilon=cfg.norm_epsilon, use_bias=cfg.use_bias,
                                dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                                name=name)(x_BTD)


def position_context(cfg: TransformerConfig, q_positions_BT: Array, kv_positions_BS: Array,
                     *, bidirectional: bool) -> relative.PositionContext:
  """The position ids the scheme reads inside attention, with what its layers share.

  Call it from the stack's module: the shared part (e.g. T5's bias table) is a parameter
  of the stack, computed once and handed to every layer.
  """
  context = relative.PositionContext(q_positions_BT, kv_positions_BS)
  return context.replace(shared=cfg.position_scheme.shared(
      context, num_heads=cfg.num_heads, features=cfg.embed_dim, bidirectional=bidirectional,
      dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype))


def next_positions(module: nn.Module, batch_size: int, length: int, decode: bool) -> Array:
  """The slots 0..T-1 of the tokens; in decode mode, continuing from those already cached.

  Decoding keeps the count in `module`'s 'cache' collection ('position_index'), so call it
  from the module that embeds the tokens (the queries' default position ids).
  """
  if not decode:
    return attention.sequence_index(batch_size, length)
  initialized = module.has_variable('cache', 'position_index')
  index = module.variable('cache', 'position_index', lambda: jnp.array(0, jnp.int32))
  if not initialized:
    return attention.sequence_index(batch_size, length)
  start = index.value
  index.value = start + length
  return attention.sequence_index(batch_size, length, start)


def key_positions(module: nn.Module, positions_BT: Array, slots_BT: Array,
                  decode: bool) -> Array:
  """The keys' position ids: the queries' own, or in decode mode all cached ones `[B, S]`.

  The cache of position ids ('cached_positions' in `module`'s cache) sits beside the
  layers' KV caches and is written at the same slots (`slots_BT`, from `next_positions`),
  so left-padded rows keep their own.
  """
  if not decode:
    return positions_BT
  initialized = module.has_variable('cache', 'cached_positions')
  cached = module.variable('cache', 'cached_positions', jnp.zeros, positions_BT.shape,
                           jnp.int32)
  if not initialized:
    return positions_BT
  cached.value = jax.lax.dynamic_update_slice(
      cached.value, positions_BT.astype(jnp.int32), (0, slots_BT[0, 0]))
  return cached.value


@dataclasses.dataclass(frozen=True)
class StackOutput:
  """A stack's final hidden states and (on request) every layer's: [embeddings, 1, ..., L]."""
  hidden_BTD: Array
  hidden_states: tuple[Array, ...] = ()


class Encoder(nn.Module):
  """Bidirectional self-attention layers (BERT, the encoder of T5/BART/the Transformer).

  Takes embedded inputs; attention stays within a packed segment and skips padding
  (segment id 0), so masks never depend on token ids (RoBERTa and BART pad with id 1).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BTD: Array, *, segment_ids_BT: Array | None, positions_BT: Array,
               deterministic: bool = True, hidden_states: bool = False) -> StackOutput:
    cfg = self.config
    batch_size, length = x_BTD.shape[:2]
    mask_B1TS = cfg.mask_pattern(attention.sequence_index(batch_size, length))
    if segment_ids_BT is not None:
      mask_B1TS &= attention.segment_mask(segment_ids_BT)
    context = position_context(cfg, positions_BT, positions_BT, bidirectional=True)
    block_args = (mask_B1TS, None, context, None, None, deterministic, False)
    y_BTD, outputs = run_blocks(self, cfg, x_BTD, block_args, hidden_states=hidden_states)
    y_BTD = final_norm(cfg, y_BTD)
    return StackOutput(y_BTD, _hidden_states(hidden_states, x_BTD, outputs, y_BTD))


class Decoder(nn.Module):
  """Causal self-attention layers, optionally attending to an encoding; KV cache in decode.

  GPT runs it in its own scope (`nn.share_scope`), so its parameters keep GPT-2's flat
  names; the encoder-decoder families hold it as a submodule.
  """
  config: TransformerConfig
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, *, positions_BT: Array, key_positions_BS: Array,
               segment_ids_BT: Array | None = None, prefix_lengths_B: Array | None = None,
               encoded_BSD: Array | None = None, encoder_segment_ids_BS: Array | None = None,
               deterministic: bool = True, decode: bool = False,
               hidden_states: bool = False) -> StackOutput:
    """Args as GPT's; `key_positions_BS` are the keys' position ids (the cache's in decode).

    Decoding masks against the cache inside each attention layer, so it hands the
    segment ids down instead of a mask, and a 'prefix_lm' mask's `prefix_lengths_B` too:
    then counted in cache slots, given on every call, the whole prefix written by one
    call (usually the prompt's, see decoding.py). With cross-attention, decoding passes
    `encoded_BSD` on its first call only (its keys/values are cached then) and None after,
    with the source's `encoder_segment_ids_BS` on every call.
    """
    cfg = self.config
    batch_size, length = x_BTD.shape[:2]
    if encoded_BSD is not None and not self.cross_attention:
      raise ValueError('encoded_BSD was given to a decoder without cross-attention')
    if self.cross_attention and encoded_BSD is None and not decode:
      raise ValueError('a decoder with cross-attention needs encoded_BSD')
    context = position_context(cfg, positions_BT, key_positions_BS, bidirectional=False)
    cross_mask_B1TS = None
    if self.cross_attention and encoder_segment_ids_BS is not None:
      # Target segment k sees source segment k; padding queries (segment 0) see nothing.
      q_segments_BT = (jnp.ones((batch_size, length), jnp.int32) if segment_ids_BT is None
                       else segment_ids_BT)
      cross_mask_B1TS = attention.segment_mask(q_segments_BT, encoder_segment_ids_BS)
    mask_B1TS = None
    if not decode:
      mask_B1TS = cfg.mask_pattern(attention.sequence_index(batch_size, length),
                                   prefix_lengths_B=prefix_lengths_B)
      if segment_ids_BT is not None:
        mask_B1TS &= attention.segment_mask(segment_ids_BT)
      segment_ids_BT = prefix_lengths_B = None
    block_args = (mask_B1TS, segment_ids_BT, context, encoded_BSD, cross_mask_B1TS,
                  deterministic, decode, prefix_lengths_B)
    y_BTD, outputs = run_blocks(self, cfg, x_BTD, block_args,
                                cross_attention=self.cross_attention,
                                hidden_states=hidden_states)
    y_BTD = final_norm(cfg, y_BTD)
    return StackOutput(y_BTD, _hidden_states(hidden_states, x_BTD, outputs, y_BTD))


def _hidden_states(wanted: bool, inputs_BTD: Array, outputs: list[Array],
                   final_BTD: Array) -> tuple[Array, ...]:
  """(inputs, layer 1, ..., layer L) as Hugging Face counts them, or () when not wanted.

  The last entry is the stack's output (after a pre-LN stack's final norm), as in
  `transformers`' `output_hidden_states`.
  """
  if not wanted:
    return ()
  return (inputs_BTD, *outputs[:-1], final_BTD)
