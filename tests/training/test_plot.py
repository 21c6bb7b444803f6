from training import plot


def test_curves_group_by_split_and_keep_the_last_record_of_a_step(tmp_path):
  records = [
      {'step': 2, 'split': 'train', 'loss': 5.0},
      {'step': 1, 'split': 'train', 'loss': 6.0},
      {'step': 2, 'split': 'validation', 'loss': 5.5},
      {'step': 2, 'split': 'train', 'loss': 4.0},  # a resumed run re-logs step 2
  ]
  assert plot.curves(records, 'loss') == {'train': ([1, 2], [6.0, 4.0]),
                                          'validation': ([2], [5.5])}


def test_plot_writes_a_png(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
  out = tmp_path / 'loss.png'
  plot.plot(str(tmp_path), str(out))
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
