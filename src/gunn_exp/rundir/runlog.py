"""`<run>/<task>.log`: the run's log file, written from the moment the run is accepted.

Hydra configures logging, log file included, before the task starts. conf/hydra/default.yaml
sends the root logger's lines through `HeldLog`, which keeps them in memory until the run passes
its pre-run checks (training.guard.accept_run releases them, and every later line goes straight
through). A run refused before that, even one that ends in a crash, writes no line into the run
directory; its lines are on the console. Imports nothing heavy: Hydra builds the handler before
train.py has checked the config.
"""

from __future__ import annotations

import logging
from logging.handlers import MemoryHandler


class HeldLog(MemoryHandler):
    """A MemoryHandler that writes nothing into `target` until `write_through()`, then everything.

    Unlike MemoryHandler, no buffer size, log level or `logging.shutdown` at exit writes the
    held lines: only the run that is accepted does.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(capacity=0, target=target, flushOnClose=False)
        self.held = True

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return not self.held

    def flush(self) -> None:
        if not self.held:
            super().flush()

    def write_through(self) -> None:
        """Write the lines held so far, and every later one as it comes."""
        self.held = False
        self.flush()


def release_held_lines() -> None:
    """Release every `HeldLog` of the root logger (none outside a Hydra run: a no-op)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HeldLog):
            handler.write_through()
