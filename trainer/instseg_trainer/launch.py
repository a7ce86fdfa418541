"""`python -m instseg_trainer.launch [torchrun options] -m instseg_trainer.cli train ...`:
torchrun for the operator's multi-process trainer pods, with two differences.

- Worker 0 hosts the c10d rendezvous store. When a multi-node group restarts, a worker's
  replacement may start while the old worker 0 still shuts down: it joins the old store and
  loses it a moment later (RendezvousConnectionError). torchrun would exit; this launcher
  joins again, until the new worker 0 serves the rendezvous or RETRY_SECONDS have passed.
- torchrun exits 1 whatever its workers' codes. When the first worker to fail exited with
  the trainer's bad-input code, this launcher exits with it too, so that the Job's
  podFailurePolicy fails the training at once instead of retrying what cannot succeed.
"""

from __future__ import annotations

import logging
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.run import parse_args, run

from .cli import EXIT_USER_ERROR
from .logs import configure_logging

RETRY_SECONDS = 300
RETRY_PAUSE_SECONDS = 2

log = logging.getLogger("instseg_trainer.launch")


def _exit_code(error: ChildFailedError) -> int:
    """The trainer's bad-input code when the first process to fail exited with it (torchrun
    then stops the others, which may die of its signal before they find the same problem),
    else torchrun's 1."""
    _, root_cause = error.get_first_failure()
    return EXIT_USER_ERROR if root_cause.exitcode == EXIT_USER_ERROR else 1


def _summary(error: ChildFailedError) -> str:
    """One line for the first failure: the operator shows the pod's last log line."""
    rank, failure = error.get_first_failure()
    cause = (
        f"signal {failure.signal_name()}"
        if failure.exitcode < 0
        else f"exit code {failure.exitcode}"
    )
    others = len(error.failures) - 1
    return (
        f"trainer process of rank {rank} failed ({cause})"
        + (f"; {others} other process(es) stopped with it" if others else "")
        + "; its own log lines above say why"
    )


def launch(argv: list[str]) -> int:
    """Runs torchrun with `argv`, joining the rendezvous again while its host is replaced."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            run(parse_args(argv))
            return 0
        except RendezvousConnectionError as error:
            if time.monotonic() + RETRY_PAUSE_SECONDS > deadline:
                raise
            log.warning("lost the rendezvous host (%s): joining again", error.__cause__ or error)
            time.sleep(RETRY_PAUSE_SECONDS)
        except ChildFailedError as error:
            code = _exit_code(error)
            if code != EXIT_USER_ERROR:  # bad input: the trainer's own error stays the last line
                log.error("%s", _summary(error))
            return code


def main() -> int:
    configure_logging()
    return launch(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
