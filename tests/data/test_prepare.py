"""`python -m data.prepare`: which tokenizers it trains, and that a second run is a no-op."""

from data import prepare


def test_tokenizers_of_the_gpt_config_and_extra_sizes():
  configs = prepare.tokenizer_configs('/nowhere', extra_vocab=[1000, 512])
  settings = {(c.name, c.text_key, c.tokenizer, c.vocab_size) for c in configs}
  # configs/gpt.py: tiny uses 512, small 2048; 512 again from the flag is not repeated.
  assert {('bible/en', 'text', 'bpe', 512), ('bible/en', 'text', 'bpe', 2048),
          ('bible/en', 'text', 'bpe', 1000)} <= settings
  assert len(settings) == len(configs)
  assert all(c.data_dir == '/nowhere' for c in configs)


def test_second_run_reuses_everything(real_data_dir, capsys):
  tokenizers = sorted((real_data_dir / 'tokenizers').iterdir())
  mtimes = [p.stat().st_mtime_ns for p in tokenizers]
  assert prepare.main([f'--data_dir={real_data_dir}']) == 0
  out = capsys.readouterr().out
  assert 'bible/en: train 2128, validation 130, test 120' in out
  assert 'bible/en_es: train 27139, validation 1876, test 2062' in out
  assert 'bible/kjv_web: train 27156, validation 1877, test 2062' in out
  assert [p.stat().st_mtime_ns for p in tokenizers] == mtimes  # nothing retrained
