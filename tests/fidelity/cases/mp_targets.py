"""Targets for multiprocessing children: a spawned child imports this module,
which stays small so it does not pay for importing the test module's imports.
"""

from __future__ import annotations

import os
from multiprocessing import Queue


def square(n: int) -> int:
    return n * n


def put_pid(queue: Queue[int]) -> None:
    queue.put(os.getpid())
