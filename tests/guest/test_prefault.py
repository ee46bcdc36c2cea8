"""The spare's copy-on-write pre-faulting (guest/prefault.py), on the host's kernel."""

from __future__ import annotations

import os
import resource
import struct

import pytest

from pytest_microsandbox.guest.prefault import MAX_RUNS, HotPages, own_pages

PAGES = 512


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _in_child(body) -> int:  # type: ignore[no-untyped-def]
    """Run ``body`` in a forked child; its return value (a small int) via a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_end, struct.pack("<q", body()))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    data = os.read(read_end, 8)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return int(struct.unpack("<q", data)[0])


@pytest.fixture
def buffer() -> bytearray:
    data = bytearray(PAGES * 4096)
    for i in range(0, len(data), 4096):
        data[i] = 1  # present in the parent, shared with every child
    return data


def test_a_learned_spare_takes_the_faults_before_its_test(buffer: bytearray) -> None:
    hot = HotPages()

    def first_test() -> int:
        for i in range(0, len(buffer), 4096):
            buffer[i] = 2
        hot.learn()
        return 0

    _in_child(first_test)
    hot.load()
    assert hot.runs
    assert sum(length for _, length in hot.runs) >= PAGES * 4096

    def later_test(prefault: bool) -> int:
        if prefault:
            hot.prefault()
        before = _faults()
        for i in range(0, len(buffer), 4096):
            buffer[i] = 3
        return _faults() - before

    cold = _in_child(lambda: later_test(False))
    warm = _in_child(lambda: later_test(True))
    assert cold >= PAGES
    assert warm < PAGES // 4
    assert buffer[0] == 1  # the children's writes stayed theirs


def test_prefault_keeps_the_contents(buffer: bytearray) -> None:
    hot = HotPages()
    _in_child(lambda: (hot.learn(), 0)[1])
    hot.load()

    def check() -> int:
        hot.prefault()
        return sum(buffer[i] for i in range(0, len(buffer), 4096))

    assert _in_child(check) == PAGES


def test_only_the_first_test_process_records() -> None:
    hot = HotPages()
    _in_child(lambda: (hot.learn(), 0)[1])
    first = bytes(hot.record[:64])
    _in_child(lambda: (hot.learn(), 0)[1])
    assert bytes(hot.record[:64]) == first


def test_a_scribbled_record_is_bounded_and_harmless() -> None:
    hot = HotPages()
    hot.record[:8] = struct.pack("<Q", 1 << 60)  # a huge count
    hot.record[8:24] = struct.pack("<QQ", 4096, 1 << 40)  # unmapped
    hot.load()
    assert len(hot.runs) <= MAX_RUNS
    assert _in_child(lambda: (hot.prefault(), 0)[1]) == 0


def test_own_pages_are_private_writable_runs() -> None:
    runs = own_pages()
    assert runs
    assert all(addr % 4096 == 0 and length > 0 and length % 4096 == 0 for addr, length in runs)
    assert runs == sorted(runs)
