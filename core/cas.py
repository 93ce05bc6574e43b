"""One compare-and-swap loop for every read-modify-write of shared state: the promoted pointer, a dataset's
head, the job line. Each round reads, computes and writes conditionally; a round that lost the race (another
writer came first) returns None, and the next round starts from a fresh read after a short, growing, jittered
pause, so that writers who collided do not collide again in step."""
from __future__ import annotations

import random
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

ATTEMPTS = 50  # rounds before an update gives up; each lost round means another writer made progress


class Contended(Exception):
    """Every round lost: the state kept changing under this update."""


def swap(attempt: Callable[[], Optional[T]], *, what: str, attempts: int = ATTEMPTS) -> T:
    """Run `attempt` until it returns something other than None (its write went through), at most `attempts`
    times; raises Contended naming `what` when every round lost."""
    for n in range(attempts):
        done = attempt()
        if done is not None:
            return done
        time.sleep(random.uniform(0.01, 0.05) * min(n + 1, 10))  # let the winner finish
    raise Contended(f"{what} kept changing under this update ({attempts} tries); try again")
