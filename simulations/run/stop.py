"""Stopping a simulation on Ctrl-C or SIGTERM without losing anything.

The first SIGINT or SIGTERM asks the server to stop after the round it is in: the
round finishes, its checkpoint is written, and the run ends with
:class:`RunStopped` (resume it with ``--resume``). A second signal stops at once:
the round in flight is dropped, and the last checkpoint, written atomically, is
what a resume starts from. Nothing a device spent is lost either way: its ledger
is written before its reply leaves (:mod:`client.store`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped on a signal; ``at_once`` when the round in flight was dropped."""

    def __init__(self, run_dir, *, after_round: int | None, at_once: bool):
        self.run_dir, self.after_round, self.at_once = run_dir, after_round, at_once
        where = (f"after round {after_round}'s checkpoint" if after_round is not None
                 else "at its last checkpoint")
        super().__init__(f"stopped {where}; resume with: fedpersona simulate --out "
                         f"{run_dir} --resume")


class StopRequest:
    """Set by the first signal; read by the server between rounds."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signals = 0

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    @contextlib.contextmanager
    def on_signals(self, say: Callable[[str], None]) -> Iterator[StopRequest]:
        """While inside, the first SIGINT/SIGTERM sets the request and the second raises
        :class:`KeyboardInterrupt` in the main thread. Outside the main thread (where
        Python cannot take signals), nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum, frame) -> None:
            self.signals += 1
            if self.signals == 1:
                self.set()
                say(f"{signal.Signals(signum).name}: stopping after this round's checkpoint "
                    "(once more to stop at once; the last checkpoint is kept)")
                return
            raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
