"""Subprocesses, signals, threads, multiprocessing (fork and spawn), /dev/shm."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory

import pytest
from mp_targets import put_pid, square


def test_subprocess_python() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == str(sys.version_info[:2])


def test_subprocess_shell_exit_code_and_pipes() -> None:
    out = subprocess.run("echo a b | wc -w; exit 3", shell=True, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (3, "2")


def test_subprocess_killed_by_a_signal() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_signal_handler_runs() -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]


def test_alarm_interrupts_a_sleep() -> None:
    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            time.sleep(30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_threads() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sum(pool.map(square, range(100))) == sum(n * n for n in range(100))
    ready = threading.Event()
    threading.Thread(target=ready.set).start()
    assert ready.wait(10)


def test_multiprocessing_fork() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=put_pid, args=(queue,))
    child.start()
    pid = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and pid == child.pid != os.getpid()


def test_multiprocessing_fork_pool() -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(square, range(10)) == [n * n for n in range(10)]


def test_multiprocessing_spawn() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=put_pid, args=(queue,))
    child.start()
    pid = queue.get(timeout=120)
    child.join(120)
    assert child.exitcode == 0 and pid == child.pid


def test_multiprocessing_lock_and_shared_memory() -> None:
    lock = multiprocessing.get_context("fork").Lock()  # a POSIX semaphore in /dev/shm
    with lock:
        block = shared_memory.SharedMemory(create=True, size=64)
        try:
            block.buf[:5] = b"hello"
            other = shared_memory.SharedMemory(name=block.name)
            assert bytes(other.buf[:5]) == b"hello"
            other.close()
        finally:
            block.close()
            block.unlink()


def test_dev_shm_is_a_writable_tmpfs() -> None:
    path = f"/dev/shm/fidelity-{os.getpid()}"
    with open(path, "w") as f:
        f.write("x")
    try:
        assert os.stat(path).st_size == 1
    finally:
        os.unlink(path)
    assert os.access("/dev/shm", os.W_OK)
