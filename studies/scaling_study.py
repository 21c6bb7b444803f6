"""Why attention divides by sqrt(d_k): softmax saturation and gradients, scaled vs unscaled.

  python -m studies.scaling_study --out=docs/attention_scaling.md   # and a .png beside it

One attention op of our module (`models.attention.attend`, 'scaled_dot' vs 'dot' score) on
random q, k, v with unit-variance entries. q·k then has variance d_k, so unscaled logits
grow like sqrt(d_k) and the softmax tends to one-hot rows, whose gradient vanishes; the
1/sqrt(d_k) scale keeps the logits' variance at 1 for every d_k. Per attention row we
measure the largest probability, the entropy (as a fraction of log S, the uniform row's),
and the gradient norms of sum(out · g) (g a random cotangent of unit norm per row) w.r.t.
the logits (taken as a zero bias added to them) and w.r.t. the queries.
"""

import argparse
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp

from models import attention
from training import metrics

SCORES = ('scaled_dot', 'dot')


@dataclasses.dataclass(frozen=True)
class Setup:
  """Shapes and repetitions of the measurement."""
  head_dims: tuple[int, ...] = (16, 64, 256, 1024)
  batch: int = 8
  length: int = 128  # queries and keys (S): a uniform row has max-probability 1/S
  seed: int = 0


def _stats(q_BTNH, k_BSNH, v_BSNH, g_BTNH, score: str) -> dict[str, float]:
  """Saturation and gradient norms of one attention op, means over rows."""
  bias_BNTS = jnp.zeros(q_BTNH.shape[:1] + q_BTNH.shape[2:3] + q_BTNH.shape[1:2] +
                        k_BSNH.shape[1:2], jnp.float32)
  logits_BNTS = attention.get_score(score)(q_BTNH, k_BSNH)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
  log_s = math.log(k_BSNH.shape[1])
  entropy_BNT = -jnp.sum(probs_BNTS * jnp.log(jnp.maximum(probs_BNTS, 1e-30)), axis=-1)

  def loss(q, bias):
    out_BTNH = attention.attend(q, k_BSNH, v_BSNH, bias_BNTS=bias, score=score)
    return jnp.sum(out_BTNH * g_BTNH)

  dq_BTNH, dbias_BNTS = jax.grad(loss, argnums=(0, 1))(q_BTNH, bias_BNTS)
  return {
      'logit_std': float(jnp.std(logits_BNTS)),
      'max_prob': float(jnp.mean(jnp.max(probs_BNTS, axis=-1))),
      'entropy_frac': float(jnp.mean(entropy_BNT) / log_s),
      'grad_logits': float(jnp.mean(jnp.linalg.norm(dbias_BNTS, axis=-1))),
      'grad_q': float(jnp.mean(jnp.linalg.norm(dq_BTNH, axis=-1))),
  }


def measure(setup: Setup = Setup()) -> list[dict]:
  """One record per (d_k, score): {'head_dim', 'score', **stats}."""
  records = []
  for head_dim in setup.head_dims:
    keys = jax.random.split(jax.random.key(setup.seed), 4)
    shape = (setup.batch, setup.length, 1, head_dim)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    # A cotangent of unit norm per row, so gradient norms do not grow with d_k merely
    # because out · g sums over d_k features.
    g = g / math.sqrt(head_dim)
    for score in SCORES:
      records.append(dict(head_dim=head_dim, score=score, **_stats(q, k, v, g, score)))
  return records


def table(records: list[dict]) -> str:
  names = ('logit_std', 'max_prob', 'entropy_frac', 'grad_logits', 'grad_q')
  lines = ['| d_k | score | ' + ' | '.join(names) + ' |', '|---|---|' + '---|' * len(names)]
  for r in records:
    lines.append(f"| {r['head_dim']} | {r['score']} | " +
                 ' | '.join(f'{r[n]:.4g}' for n in names) + ' |')
  return '\n'.join(lines)


def plot(records: list[dict], out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = (('max_prob', 'mean max probability of a row', False),
            ('entropy_frac', 'row entropy / log S', False),
            ('grad_logits', '|d out·g / d logits| per row', True))
  fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.6))
  for ax, (name, label, log_y) in zip(axes, panels):
    for score, style in zip(SCORES, ('o-', 's--')):
      rows = [r for r in records if r['score'] == score]
      ax.plot([r['head_dim'] for r in rows], [r[name] for r in rows], style,
              label='scaled 1/sqrt(d_k)' if score == 'scaled_dot' else 'unscaled')
    ax.set_xscale('log', base=2)
    if log_y:
      ax.set_yscale('log')
    else:
      ax.set_ylim(0, 1)  # both are fractions: 1/S .. 1, and 0 .. 1
    ax.set_xlabel('d_k')
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _span(records: list[dict], score: str, name: str) -> tuple[float, float]:
  """(value at the smallest d_k, value at the largest) of one score's records."""
  rows = sorted((r for r in records if r['score'] == score), key=lambda r: r['head_dim'])
  return rows[0][name], rows[-1][name]


def findings(records: list[dict]) -> str:
  """What the table shows, in words written from the measured values."""
  dims = sorted({r['head_dim'] for r in records})
  lines = []
  for name, what in (('logit_std', 'logit standard deviation'),
                     ('max_prob', 'mean max probability'),
                     ('entropy_frac', 'entropy / log S'),
                     ('grad_logits', 'gradient norm w.r.t. the logits'),
                     ('grad_q', 'gradient norm w.r.t. the queries')):
    (s0, s1), (u0, u1) = _span(records, 'scaled_dot', name), _span(records, 'dot', name)
    lines.append(f'- {what}, d_k {dims[0]} -> {dims[-1]}: scaled {s0:.3g} -> {s1:.3g} '
                 f'(x{s1 / s0:.2f}), unscaled {u0:.3g} -> {u1:.3g} (x{u1 / u0:.2f})')
  return '\n'.join(lines) + """

Reading: unscaled logits have standard deviation about sqrt(d_k), so the rows saturate
(max probability towards 1, entropy towards 0) and the gradient through the softmax (w.r.t.
the logits) shrinks as d_k grows; the 1/sqrt(d_k) scale keeps the logits at unit variance,
and saturation and that gradient stay level. The unscaled gradient w.r.t. the queries does
not shrink here: d logits / d q = k has norm sqrt(d_k) and no 1/sqrt(d_k) to offset it, which
outgrows the softmax's shrinking Jacobian at these d_k. What vanishes is the signal through
saturated rows (most keys get almost no gradient), while the step size in q grows with d_k;
both are what the scale removes."""


def write_doc(records: list[dict], setup: Setup, out: str) -> None:
  png = os.path.splitext(out)[0] + '.png'
  plot(records, png)
  text = f"""# Attention scaling: softmax saturation and gradients as d_k grows

Command: `.venv/bin/python -m studies.scaling_study --out={out}` (run by `make positions`)

Machine: {metrics.describe_machine()}

One attention op of `models.attention.attend` with score 'scaled_dot' (q·k/sqrt(d_k)) or
'dot' (q·k): q, k, v have i.i.d. N(0, 1) entries, the cotangent g N(0, 1/d_k) (unit norm
per row), batch {setup.batch},
{setup.length} queries and keys, one head, seed {setup.seed}. Per attention row: the largest
probability (a uniform row has 1/{setup.length} = {1 / setup.length:.4f}), the entropy as a
fraction of log S, and the norms of the gradient of sum(out · g) with respect to the logits
(a zero bias added to them) and to the query; all means over rows.

{table(records)}

![saturation and gradient vs d_k]({os.path.basename(png)})

{findings(records)}

```json
{json.dumps(records, indent=1)}
```
"""
  with open(out, 'w') as f:
    f.write(text)
  print(f'wrote {out} and {png}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='docs/attention_scaling.md')
  args = parser.parse_args(argv)
  setup = Setup()
  records = measure(setup)
  print(table(records))
  write_doc(records, setup, args.out)


if __name__ == '__main__':
  main()
