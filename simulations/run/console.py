"""What a person sees while a long command runs: our lines on the console, everything
the libraries print in the run's ``run.log``.

A simulation's libraries print a great deal: transformers' weight-loading and GGUF
bars and FutureWarnings in every Ray worker, Ray's own warnings, Flower's
deprecation banner and logs. All of it is written to file descriptors 1 and 2 (Ray
forwards its workers' output through the driver's), so the only reliable way to keep
it off the console is at the descriptor level: both point at ``run.log`` while the
command runs, and our own lines go to a copy of the console's descriptor (and into
the log too, so it reads as the whole story).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

RUN_LOG = "run.log"


@contextlib.contextmanager
def quiet_libraries(log_path: Path, *, verbose: bool = False) -> Iterator[Callable[[str], None]]:
    """Within the block, descriptors 1 and 2 append to ``log_path``; yields the function
    that shows one of our lines on the console. ``verbose``: nothing is redirected."""
    if verbose:
        yield lambda line: print(line, flush=True)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)

        def say(line: str) -> None:
            console.write(line + "\n")
            console.flush()
            sys.stdout.flush()
            log.write(line + "\n")

        try:
            yield say
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()
