"""fs().read_stream / write_stream / copy against the real agent as a host
process (HostProcessBackend: its paths are host paths), no VM.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from pytest_microsandbox.runtime import (
    FilesystemError,
    PathNotFoundError,
    Sandbox,
    SandboxConfig,
    SyncSandbox,
)
from pytest_microsandbox.runtime import sandbox as sandbox_module
from pytest_microsandbox.runtime.agent.client import AgentClient
from pytest_microsandbox.runtime.hostproc import HostProcessBackend


def run(body: Callable[[Sandbox], Awaitable[None]]) -> None:
    async def main() -> None:
        sb = await Sandbox.create(SandboxConfig(name="fake"), backend=HostProcessBackend())
        try:
            await body(sb)
        finally:
            await sb.stop()

    anyio.run(main)


def test_read_stream_reads_window_by_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox_module, "READ_STREAM_WINDOW", 4096)
    payload = os.urandom(3 * 4096 + 123)
    (tmp_path / "big.bin").write_bytes(payload)
    (tmp_path / "exact.bin").write_bytes(payload[: 2 * 4096])
    (tmp_path / "empty.bin").write_bytes(b"")
    windows: list[tuple[int, int | None]] = []
    real = AgentClient.read_file_to

    async def spy(self: AgentClient, path: str, sink: object, *a: object, **kw: object) -> int:
        windows.append((kw["offset"], kw["length"]))  # type: ignore[arg-type]
        return await real(self, path, sink, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(AgentClient, "read_file_to", spy)

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        chunks = [c async for c in fs.read_stream(str(tmp_path / "big.bin"))]
        assert b"".join(chunks) == payload
        assert all(0 < len(c) <= 4096 for c in chunks)
        # One window of host memory at a time: the file was asked for in 4 KiB windows.
        assert windows == [(0, 4096), (4096, 4096), (8192, 4096), (12288, 4096)]
        exact = [c async for c in fs.read_stream(str(tmp_path / "exact.bin"))]
        assert b"".join(exact) == payload[: 2 * 4096]
        assert [c async for c in fs.read_stream(str(tmp_path / "empty.bin"))] == []
        with pytest.raises(PathNotFoundError):
            async for _ in fs.read_stream(str(tmp_path / "missing")):
                pass
        with pytest.raises(FilesystemError):
            async for _ in fs.read_stream(str(tmp_path)):
                pass

    run(body)


def test_write_stream_takes_sync_and_async_iterables(tmp_path: Path) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for n in range(3):
            yield bytes([n]) * 2_000_000

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        target = tmp_path / "sub" / "out.bin"
        assert await fs.write_stream(str(target), gen()) == 6_000_000
        assert target.read_bytes() == b"".join(bytes([n]) * 2_000_000 for n in range(3))
        assert await fs.write_stream(str(target), [b"a", bytearray(b"b"), b""], mode=0o600) == 2
        assert target.read_bytes() == b"ab"
        assert target.stat().st_mode & 0o777 == 0o600
        with pytest.raises(TypeError, match="bytes"):
            await fs.write_stream(str(target), ["text"])  # type: ignore[list-item]

    run(body)


def test_copy_inside_the_guest_keeps_the_mode(tmp_path: Path) -> None:
    src = tmp_path / "tool.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n")
    src.chmod(0o750)

    async def body(sb: Sandbox) -> None:
        fs = sb.fs()
        dst = tmp_path / "deep" / "er" / "copy.sh"
        assert await fs.copy(str(src), str(dst)) == src.stat().st_size
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_mode & 0o777 == 0o750
        with pytest.raises(PathNotFoundError):
            await fs.copy(str(tmp_path / "missing"), str(dst))
        with pytest.raises(FilesystemError):
            await fs.copy(str(tmp_path / "deep"), str(tmp_path / "dircopy"))

    run(body)


def test_the_sync_twins(tmp_path: Path) -> None:
    with SyncSandbox.create(SandboxConfig(name="fake"), backend=HostProcessBackend()) as sb:
        fs = sb.fs()
        path = str(tmp_path / "f.bin")
        assert fs.write_stream(path, iter([b"x" * 10, b"y" * 5])) == 15
        assert b"".join(fs.read_stream(path)) == b"x" * 10 + b"y" * 5
        assert fs.copy(path, str(tmp_path / "g.bin")) == 15
        # Leaving the iteration early closes the stream on the loop.
        stream = fs.read_stream(path)
        assert next(stream) == b"x" * 10 + b"y" * 5
        stream.close()
        assert fs.read(str(tmp_path / "g.bin")) == b"x" * 10 + b"y" * 5
