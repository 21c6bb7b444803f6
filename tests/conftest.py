"""Settings for every test process (pytest imports this before any test module).

The suite is compile-bound: its models are tiny, and most of a test's time is XLA
compiling it. LLVM's optimisation level 0 for the generated CPU code cuts that by about a
third (tests/objectives/test_replaced_token_detection.py: 70 -> 49 s) while the kernels
still compute the same functions; speed is measured in bench/, never in tests. Flags the
caller already set are kept, and a caller's own level wins. Set here, before any test
initialises a JAX backend, so that every xdist worker and every train.py/eval.py that a
test starts (they inherit the environment) compiles the same way.
"""

import os

FAST_COMPILE = '--xla_backend_optimization_level=0'


def with_fast_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) plus the fast-compile level unless it sets a level."""
  if 'xla_backend_optimization_level' in flags:
    return flags
  return f'{flags} {FAST_COMPILE}'.strip()


os.environ['XLA_FLAGS'] = with_fast_compile(os.environ.get('XLA_FLAGS', ''))
