"""Failure diagnostics without a VM: the ring of recent commands, kernel messages."""

from __future__ import annotations

from pytest_microsandbox.runtime._diagnostics import (
    KERNEL_LINES,
    RecentExecs,
    kernel_messages_since,
    printable,
)


def test_the_ring_keeps_the_last_commands_with_their_stderr_tail() -> None:
    recent = RecentExecs(size=3)
    assert recent.render() == "recent commands: none"
    for n in range(5):
        recent.record(["sh", "-c", f"step {n}"], f"exit {n}", f"err {n}\n".encode())
    text = recent.render()
    assert len(recent) == 3
    assert "step 0" not in text and "step 1" not in text
    assert text.index("step 2") < text.index("step 3") < text.index("step 4")
    assert "$ sh -c step 4  ->  exit 4" in text
    assert "      err 4" in text


def test_guest_bytes_are_capped_and_cleaned() -> None:
    recent = RecentExecs()
    hostile = b"\x1b[2J\x1b]0;owned\x07" + b"A" * 100_000 + b"\nlast\rline\x00\n"
    recent.record(["x" * 10_000], "exit 1", hostile)
    text = recent.render()
    assert "\x1b" not in text and "\x07" not in text and "\x00" not in text and "\r" not in text
    assert "      last\n      line" in text  # a carriage return cannot overwrite a line
    assert len(text) < 5_000


def test_printable_cuts_with_an_ellipsis() -> None:
    assert printable("a\tb\x1bc") == "a bc"
    assert printable("abcdef", 4) == "abc…"


def test_kernel_messages_since_a_point_of_uptime() -> None:
    raw = (
        b"<5>[    0.000000] Linux version 6.1\n"
        b"<6>[    1.500000] booted\n"
        b"<4>[   12.250000] oops: something\n"
        b" continuation of it\n"
        b"<6>[   13.000000] later \x1b[31mred\n"
    )
    lines = kernel_messages_since(raw, 12.0)
    assert lines == [
        "[   12.250000] oops: something",
        "   continuation of it",
        "[   13.000000] later [31mred",
    ]
    assert len(kernel_messages_since(raw, None)) == 5


def test_kernel_messages_are_bounded() -> None:
    raw = b"".join(b"<6>[%5d.000000] %s\n" % (n, b"x" * 5000) for n in range(1000))
    lines = kernel_messages_since(raw, 0.0)
    assert len(lines) == KERNEL_LINES
    assert all(len(line) <= 300 for line in lines)
    assert lines[-1].startswith("[  999.000000]")
