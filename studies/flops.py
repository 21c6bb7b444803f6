"""Pretraining compute of the encoder families, for studies that compare them at equal FLOPs.

The accounting (PaLM's appendix B, as bench/ uses it): a matmul with P parameters costs
2·P FLOPs per token forward and 4·P backward, so 6·P per trained token; attention adds
4·T·D per token per layer forward (scores and the weighted sum over T keys), 12·T·D with
the backward pass. Embedding lookups, norms, softmaxes and the optimizer are not counted.
Every position of a row is counted (padding costs the same compute), and both of our MLM
heads score every position against the whole vocabulary, as the models compute them.

    BERT-MLM step  = 6 · (encoder + MLM head) · B·T  + attention
    ELECTRA step   = 6 · (generator + its MLM head) · B·T  + its attention
                   + 6 · (discriminator + RTD head) · B·T  + its attention
The generator's samples need no backward pass through them; sampling is not counted.
"""

from models import bert
from models import electra
from models import layers


def encoder_matmul_params(cfg: bert.BertConfig) -> int:
  """Matmul parameters of the encoder body: per layer q, k, v, out (4·D²) and the MLP
  (2·D·F, 3·D·F gated), plus the embedding projection E -> D where widths differ."""
  d, f = cfg.embed_dim, cfg.mlp_dim
  mlp = (3 if layers.is_gated(cfg.activation) else 2) * d * f
  projection = cfg.embedding_width * d if cfg.embedding_width != d else 0
  return cfg.num_layers * (4 * d * d + mlp) + projection


def mlm_head_matmul_params(cfg: bert.BertConfig) -> int:
  """The MLM head: dense D -> E, then the tied output projection E -> V."""
  return cfg.embed_dim * cfg.embedding_width + cfg.embedding_width * cfg.vocab_size


def attention_flops_per_token(cfg: bert.BertConfig, seq_len: int) -> int:
  """Scores and weighted values over `seq_len` keys, forward and backward, all layers."""
  return 12 * cfg.num_layers * seq_len * cfg.embed_dim


def bert_mlm_flops_per_token(cfg: bert.BertConfig, seq_len: int) -> int:
  """One trained token of an MLM encoder (the pooler and NSP head, once per row, are
  negligible and not counted)."""
  return (6 * (encoder_matmul_params(cfg) + mlm_head_matmul_params(cfg))
          + attention_flops_per_token(cfg, seq_len))


def electra_flops_per_token(cfg: electra.ElectraConfig, seq_len: int) -> int:
  """One trained token of ELECTRA: the generator with its MLM head, and the discriminator
  with its RTD head (D² + D)."""
  discriminator = cfg.discriminator
  return (bert_mlm_flops_per_token(cfg.generator, seq_len)
          + 6 * (encoder_matmul_params(discriminator) + discriminator.embed_dim ** 2
                 + discriminator.embed_dim)
          + attention_flops_per_token(discriminator, seq_len))


def pretraining_flops_per_token(model_name: str, model_fields: dict, seq_len: int) -> int:
  """FLOPs per trained token of a pretraining run's model (config.model_name, config.model)."""
  if model_name == 'electra':
    return electra_flops_per_token(electra.ElectraConfig(**model_fields), seq_len)
  if model_name == 'bert':
    return bert_mlm_flops_per_token(bert.BertConfig(**model_fields), seq_len)
  raise ValueError(f'no FLOPs accounting for model {model_name!r} (bert, electra)')
