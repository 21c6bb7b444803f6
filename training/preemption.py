"""SIGTERM as a preemption notice: save at the current step, then exit within a grace period.

Orbax's own preemption check only works through `jax.distributed` (it asks the coordination
service); a single process has to catch the signal itself. The handler only sets a flag: the
training loop saves at the next step boundary, where the state is consistent.
"""

import os
import signal
import threading
import time


class Preemption:
  """Catches SIGTERM while active; `requested` turns true once one arrives.

  If the loop has not finished its save within `grace_seconds` of the signal, a watchdog
  ends the process: the orchestrator would kill it anyway, and Orbax's commit protocol
  means a half-written checkpoint is never taken for a complete one.
  """

  def __init__(self, grace_seconds: float):
    self.grace_seconds = grace_seconds
    self._event = threading.Event()
    self._previous = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _handle(self, signum, frame):
    del signum, frame
    if not self._event.is_set():
      self._event.set()
      threading.Thread(target=self._watchdog, daemon=True).start()

  def _watchdog(self):
    time.sleep(self.grace_seconds)
    print(f'preemption: no clean exit {self.grace_seconds:.0f}s after SIGTERM; exiting now',
          flush=True)
    os._exit(143)  # 128 + SIGTERM, as if the signal had killed us

  def __enter__(self) -> 'Preemption':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
