"""Copy-on-write faults taken by the spare test process, not by the test.

Under process isolation each test runs in a child forked from the runner. The
child's first writes to the runner's pages (Python writes a reference count on
every object it touches) each take a copy-on-write fault: ~950 per test for a
small real suite, and under emulation each fault is guest kernel code run
through TCG. Measured natively on that suite: a forked child ran a test in
~25 ms against ~1 ms in the runner itself, and ~10 ms once its pages were
copied in advance.

So the runner learns, once, which pages a test process made its own: the first
test's child, after its ``done``, reads ``/proc/self/pagemap`` over its private
writable mappings and records the present pages mapped only by itself. Every
later spare (forked while the current test runs, and waiting for its request)
copies those pages in advance with ``madvise(MADV_POPULATE_WRITE)``, which keeps
their contents. The test then finds them already its own.

Best effort: on a kernel without ``MADV_POPULATE_WRITE`` (before 5.14), without
``/proc/self/pagemap``, or with ``$MICROSANDBOX_NO_PREFAULT`` set in the runner's
environment, nothing is copied in advance and tests run as before. A test that
scribbles over the shared record only makes later spares copy other pages of
their own memory.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import Any

__all__ = ["PREFAULT_OFF_ENV", "HotPages"]

PREFAULT_OFF_ENV = "MICROSANDBOX_NO_PREFAULT"

_MADV_POPULATE_WRITE = 23
#: pagemap bits: 63 the page is present, 56 it is mapped by this process only.
_OWN = (1 << 63) | (1 << 56)
#: Runs of learned pages closer than this many pages are merged: one madvise
#: (a syscall under emulation) costs more than copying a few pages needlessly.
_GAP_PAGES = 8
#: Runs recorded at most (16 bytes each in the shared record).
MAX_RUNS = 8192
_HEADER = struct.Struct("<Q")
_RUN = struct.Struct("<QQ")


def _private_writable() -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=2)
            if len(fields) > 1 and fields[1].startswith("rw") and fields[1][3:4] == "p":
                low, _, high = fields[0].partition("-")
                spans.append((int(low, 16), int(high, 16)))
    return spans


def own_pages() -> list[tuple[int, int]]:
    """(address, length) runs of the present pages only this process maps, in its
    private writable mappings, nearby runs merged.
    """
    page = mmap.PAGESIZE
    runs: list[tuple[int, int]] = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for low, high in _private_writable():
            try:
                data = os.pread(fd, (high - low) // page * 8, low // page * 8)
            except OSError:
                continue  # [vsyscall] and the like
            entries = memoryview(data).cast("Q")
            start = end = -1
            for i, entry in enumerate(entries):
                if entry & _OWN != _OWN:
                    continue
                if start >= 0 and i - end <= _GAP_PAGES:
                    end = i + 1
                    continue
                if start >= 0:
                    runs.append((low + start * page, (end - start) * page))
                start, end = i, i + 1
            if start >= 0:
                runs.append((low + start * page, (end - start) * page))
    finally:
        os.close(fd)
    return runs


class HotPages:
    """The pages a test process made its own, learned once from the first test
    (through an anonymous mapping shared with the forked children) and copied in
    advance by every later spare.
    """

    def __init__(self) -> None:
        self.record = mmap.mmap(-1, _HEADER.size + MAX_RUNS * _RUN.size)
        self.runs: tuple[tuple[int, int], ...] = ()
        self._madvise: Any = None

    @property
    def learned(self) -> bool:
        return bool(self.runs) or _HEADER.unpack_from(self.record)[0] != 0

    def learn(self) -> None:
        """In a test's process, after its ``done``: record its own pages, unless
        another test's process already did.
        """
        if self.learned:
            return
        try:
            runs = own_pages()[:MAX_RUNS]
        except (OSError, ValueError):
            runs = []
        for i, run in enumerate(runs):
            _RUN.pack_into(self.record, _HEADER.size + i * _RUN.size, *run)
        _HEADER.pack_into(self.record, 0, max(1, len(runs)))  # 1 empty run: tried

    def load(self) -> None:
        """In the runner, after a test's process exited: take what it recorded."""
        if self.runs:
            return
        count = min(_HEADER.unpack_from(self.record)[0], MAX_RUNS)
        runs = (_RUN.unpack_from(self.record, _HEADER.size + i * _RUN.size) for i in range(count))
        self.runs = tuple((addr, length) for addr, length in runs if length > 0)

    def prefault(self) -> None:
        """In a spare, before it waits for its request: copy the learned pages."""
        if not self.runs:
            return
        if self._madvise is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
        for addr, length in self.runs:
            # Fails harmlessly (EINVAL: an old kernel; ENOMEM: no longer mapped).
            failed = self._madvise(addr, length, _MADV_POPULATE_WRITE) != 0
            if failed and ctypes.get_errno() == errno.EINVAL:
                return
