"""Host-directory volumes (virtio-9p) against real QEMU VMs (TCG here).

One clone with a read-write and a read-only volume serves most tests; its
configuration (default cpus/memory) shares its template with the other
default-config VM tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import (
    ConfigError,
    FilesystemError,
    SandboxConfig,
    SnapshotError,
    SyncSandbox,
    Volume,
)
from pytest_microsandbox.runtime.config import MAX_VOLUMES

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def host_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("volumes")
    dirs = {name: root / name for name in ("rw", "ro", "secret")}
    for path in dirs.values():
        path.mkdir()
    (dirs["ro"] / "from-host.txt").write_text("written by the host\n")
    (dirs["secret"] / "marker").write_text("outside every volume\n")
    # Host-made links pointing out of the volume: the guest must not reach through them.
    (dirs["rw"] / "abs-link").symlink_to(dirs["secret"])
    (dirs["rw"] / "rel-link").symlink_to("../secret")
    return dirs


@pytest.fixture(scope="module")
def vol_sandbox(host_dirs: dict[str, Path]) -> Iterator[SyncSandbox]:
    config = SandboxConfig(
        name="volumes",
        volumes={
            "/mnt/rw": Volume.bind(host_dirs["rw"]),
            "/mnt/ro": Volume.bind(host_dirs["ro"], readonly=True),
        },
    )
    with SyncSandbox.create(config) as sb:
        yield sb


def test_default_create_is_a_template_clone_with_its_volumes(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    sb = vol_sandbox.async_sandbox
    assert sb.session.origin is not None and sb.session.origin.meta.kind == "template"
    # The shared template records no volume: they are bound per clone.
    assert SandboxConfig.from_json(sb.session.origin.meta.config).volumes == {}
    # Its template has the spare 9p devices (a template without volumes has none).
    assert sb.session.origin.meta.volume_slots == MAX_VOLUMES
    argv = Path(f"/proc/{sb.pid}/cmdline").read_text().split("\0")
    assert sum(a.startswith("virtio-9p-device") for a in argv) == MAX_VOLUMES
    mounts = vol_sandbox.fs().read_text("/proc/self/mounts")
    assert "msb.vol0 /mnt/rw 9p rw," in mounts
    assert "msb.vol1 /mnt/ro 9p ro," in mounts
    assert vol_sandbox.fs().read_text("/mnt/ro/from-host.txt") == "written by the host\n"


def test_guest_writes_land_in_the_host_directory(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    out = vol_sandbox.shell("echo from-guest > /mnt/rw/g.txt && mkdir -p /mnt/rw/d/e && ls /mnt/rw")
    assert out.success, out.stderr_text
    assert (host_dirs["rw"] / "g.txt").read_text() == "from-guest\n"
    assert (host_dirs["rw"] / "d" / "e").is_dir()
    # And a host change is seen at once (cache=none).
    (host_dirs["rw"] / "h.txt").write_text("later")
    assert vol_sandbox.fs().read_text("/mnt/rw/h.txt") == "later"
    vol_sandbox.fs().write("/mnt/rw/api.txt", "via the agent")
    assert (host_dirs["rw"] / "api.txt").read_text() == "via the agent"


def test_readonly_volume_refuses_writes(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    for script in (
        "echo x > /mnt/ro/new.txt",
        "echo x >> /mnt/ro/from-host.txt",
        "rm /mnt/ro/from-host.txt",
        # Remounting read-write in the guest does not help: QEMU exports it read-only.
        "mount -o remount,rw /mnt/ro && echo x > /mnt/ro/new.txt",
    ):
        out = vol_sandbox.shell(script)
        assert not out.success, script
        assert "Read-only file system" in out.stderr_text, (script, out.stderr_text)
    assert sorted(os.listdir(host_dirs["ro"])) == ["from-host.txt"]
    assert (host_dirs["ro"] / "from-host.txt").read_text() == "written by the host\n"
    vol_sandbox.shell("mount -o remount,ro /mnt/ro")


def test_guest_cannot_reach_outside_the_volume(
    vol_sandbox: SyncSandbox, host_dirs: dict[str, Path]
) -> None:
    # Links are resolved by the guest, in the guest: nothing of the host's secret dir.
    for path in ("/mnt/rw/abs-link/marker", "/mnt/rw/rel-link/marker", "/mnt/rw/../secret/marker"):
        out = vol_sandbox.shell(f"cat {path}")
        assert not out.success and "outside every volume" not in out.stdout_text, path
    # A guest-made link to a host path is just a link on the host; writing through
    # it in the guest writes the guest's own file.
    out = vol_sandbox.shell(
        f"ln -s {host_dirs['secret']} /mnt/rw/guest-link && echo pwned > /mnt/rw/guest-link/marker"
    )
    assert not out.success
    assert (host_dirs["secret"] / "marker").read_text() == "outside every volume\n"
    assert os.readlink(host_dirs["rw"] / "guest-link") == str(host_dirs["secret"])


def test_snapshot_and_fork_refuse_with_a_mounted_volume(vol_sandbox: SyncSandbox) -> None:
    with pytest.raises(SnapshotError) as info:
        vol_sandbox.snapshot("never-made")
    message = str(info.value)
    assert "volume /mnt/rw (host directory" in message
    assert "without volumes=" in message and "umount /mnt/rw /mnt/ro" in message
    with pytest.raises(SnapshotError, match="volume /mnt/ro"):
        vol_sandbox.fork()
    assert vol_sandbox.exec("true").success  # still running


def test_cold_boot_mounts_volumes(host_dirs: dict[str, Path]) -> None:
    config = SandboxConfig(
        name="volumes-cold",
        cold_boot=True,
        volumes={"/data": Volume.bind(host_dirs["ro"], readonly=True)},
    )
    with SyncSandbox.create(config) as sb:
        assert sb.async_sandbox.session.origin is None
        assert sb.fs().read_text("/data/from-host.txt") == "written by the host\n"
        assert not sb.shell("touch /data/x").success


def test_restore_named_snapshot_with_volumes(host_dirs: dict[str, Path]) -> None:
    from pytest_microsandbox.snapshots import Snapshot

    volumes = {"/in": Volume.bind(host_dirs["ro"], readonly=True)}
    # A sandbox created without volumes has no 9p slots, so neither has its capture.
    with SyncSandbox.create(SandboxConfig(name="vol-none")) as plain:
        plain.snapshot("vol-snap-none")
    try:
        with pytest.raises(ConfigError, match=r"has 0 volume slots.*volume_slots=1"):
            SyncSandbox.restore("vol-snap-none", volumes=volumes)
    finally:
        Snapshot.remove("vol-snap-none")
    with SyncSandbox.create(SandboxConfig(name="vol-parent", volume_slots=1)) as parent:
        parent.fs().write("/root/state.txt", "captured")
        parent.snapshot("vol-snap")
    try:
        two = {**volumes, "/in2": Volume.bind(host_dirs["rw"])}
        with pytest.raises(ConfigError, match="has 1 volume slot and 2 bind volumes"):
            SyncSandbox.restore("vol-snap", volumes=two)
        with SyncSandbox.restore("vol-snap", name="vol-restored", volumes=volumes) as sb:
            assert sb.fs().read_text("/root/state.txt") == "captured"
            assert sb.fs().read_text("/in/from-host.txt") == "written by the host\n"
            assert sb.async_sandbox.session.origin is not None
            assert sb.async_sandbox.session.origin.meta.volume_slots == 1
    finally:
        Snapshot.remove("vol-snap")


def test_refused_mount_names_the_volume_and_leaks_no_vm(host_dirs: dict[str, Path]) -> None:
    before = set(_my_qemus())
    config = SandboxConfig(name="volumes-bad", volumes={"/bin/sh": Volume.bind(host_dirs["ro"])})
    with pytest.raises(FilesystemError, match=r"mounting volume /bin/sh \(host directory"):
        SyncSandbox.create(config)
    assert set(_my_qemus()) <= before


def _my_qemus() -> list[int]:
    me = os.getpid()
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text.split("(", 1)[1].rsplit(")", 1)
        if comm.startswith("qemu-system") and int(rest.split()[1]) == me:
            out.append(int(stat.parent.name))
    return out
