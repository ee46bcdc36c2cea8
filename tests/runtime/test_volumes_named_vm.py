"""Named volumes (persist, quota -> ENOSPC, one user at a time), tmpfs volumes,
patches and scripts, in a busybox OCI image pulled from the test registry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "images"))
from oci_helpers import busybox_entries, file, image_config, run_registry

from pytest_microsandbox.runtime import (
    FilesystemError,
    Patch,
    SandboxConfig,
    SyncSandbox,
    Volume,
)

pytestmark = pytest.mark.vm


def test_named_volume_tmpfs_patches_scripts(tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures"
    (fixtures / "sub").mkdir(parents=True)
    (fixtures / "sub/data.txt").write_text("fixture data\n")
    with run_registry() as registry:
        base = busybox_entries(("grep", "readlink", "head", "sync"))
        base["etc/app.conf"] = file("from=image\n")
        ref = registry.ref("test/vol:1")
        registry.push_image(ref.split("/", 1)[1], [base], image_config())
        vol_cache = tmp_path / "cache"
        volume = Volume.named("results", quota_mb=16, cache_dir=vol_cache)
        config = SandboxConfig(
            name="oci-volumes",
            image=ref,
            volumes={"/data": volume, "/scratch": Volume.tmpfs(size_mb=8)},
            patches=(
                Patch.text("/etc/new.conf", "x=1\n"),
                Patch.append("/etc/app.conf", "patched=yes\n"),
                Patch.copy_dir(fixtures, "/srv"),
                Patch.symlink("/bin/busybox", "/usr/bin/bb"),
            ),
            scripts={"hello": "#!/bin/sh\necho hello from a script\n"},
        )
        with SyncSandbox.create(config) as sb:
            out = sb.exec(
                "sh",
                ["-c", "cat /etc/new.conf /etc/app.conf /srv/sub/data.txt; readlink /usr/bin/bb;"
                       " hello"],
            )  # fmt: skip
            assert out.stdout_text.splitlines() == [
                "x=1",
                "from=image",
                "patched=yes",
                "fixture data",
                "/bin/busybox",
                "hello from a script",
            ]
            sb.exec("sh", ["-c", "echo kept > /data/note && sync"])
            full = sb.exec("sh", ["-c", "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1"])
            assert full.exit_code != 0 and "No space left on device" in full.stdout_text
            # The guest cleans up; the host file never passed the quota.
            sb.exec("sh", ["-c", "rm /data/big && sync"])
            tmpfs = sb.exec("sh", ["-c", "dd if=/dev/zero of=/scratch/f bs=1M count=32 2>&1"])
            assert tmpfs.exit_code != 0 and "No space left on device" in tmpfs.stdout_text
            with pytest.raises(FilesystemError, match="in use"):
                Volume.remove("results", cache_dir=vol_cache)
        assert (volume.host_path / "disk.ext4").stat().st_size == 16 << 20
        infos = Volume.list(cache_dir=vol_cache)
        assert [(i.name, i.quota_mb) for i in infos] == [("results", 16)]
        # A second sandbox (another VM, same template) sees what the first wrote.
        with SyncSandbox.create(config) as sb:
            assert sb.exec("cat", ["/data/note"]).stdout_text == "kept\n"
            assert sb.exec("sh", ["-c", "test -e /scratch/f; echo $?"]).stdout_text == "1\n"
        assert Volume.remove("results", cache_dir=vol_cache) is True
        assert Volume.list(cache_dir=vol_cache) == []
