"""SandboxConfig: validation names the field, JSON round-trips, no boot needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig, Volume
from pytest_microsandbox.runtime.config import ACCEL_ENV, MAX_VOLUMES, find_project_root


def test_defaults_and_round_trip() -> None:
    config = SandboxConfig(name="demo", cpus=2, memory=768, env={"A": "1"}, workdir="/srv")
    again = SandboxConfig.from_json(config.to_json())
    assert again == config
    assert again.cpus == 2 and again.env == {"A": "1"}


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("cpus", 0, "cpus"),
        ("memory", 16, "memory"),
        ("name", "bad name!", "name"),
        ("workdir", "relative", "workdir"),
        ("env", {"1BAD": "x"}, "env"),
        ("accel", "hvf", "accel"),
        ("boot_timeout", -1, "boot_timeout"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(**{field: value})
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match="memroy"):
        SandboxConfig(memroy=512)


def test_bad_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        SandboxConfig.from_json('{"cpus": "many"}')


def test_a_bad_stored_field_is_reported_once_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_json('{"memory": "lots"}')
    message = str(info.value)
    assert message.count("invalid SandboxConfig") == 1, message
    assert "(root)" not in message
    assert "memory: Input should be a valid integer" in message


def test_malformed_json_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid SandboxConfig") as info:
        SandboxConfig.from_json("{not json")
    assert str(info.value).count("invalid SandboxConfig") == 1


def test_accel_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ACCEL_ENV, "tcg")
    assert SandboxConfig().resolved_accel() == "tcg"
    assert SandboxConfig(accel="kvm").resolved_accel() == "kvm"
    monkeypatch.setenv(ACCEL_ENV, "bogus")
    with pytest.raises(ConfigError, match=ACCEL_ENV):
        SandboxConfig().resolved_accel()


def test_project_root_discovery(tmp_path: Path) -> None:
    (tmp_path / "proj" / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    assert find_project_root(tmp_path / "proj" / "pkg" / "sub") == tmp_path / "proj"


# -- volumes ----------------------------------------------------------------------------------


def test_volumes_round_trip_and_shapes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    config = SandboxConfig(
        volumes={
            "/data/": Volume.bind(tmp_path / "a", readonly=True),
            "/scratch": str(tmp_path / "link"),  # a bare path: read-write bind
        }
    )
    assert list(config.volumes) == ["/data", "/scratch"]  # guest paths normalized
    assert config.volumes["/data"] == Volume(host_path=tmp_path / "a", readonly=True)
    assert config.volumes["/scratch"].host_path == tmp_path / "b"  # symlink resolved
    assert not config.volumes["/scratch"].readonly
    again = SandboxConfig.from_json(config.to_json())
    assert again == config
    assert list(again.volumes) == ["/data", "/scratch"]  # order = device slot order
    # Sandbox.create(config, **overrides) goes through model_dump.
    assert SandboxConfig(**config.model_dump()) == config


@pytest.mark.parametrize(
    ("guest", "needle"),
    [
        ("data", "must be absolute"),
        ("/", "is the root"),
        ("/..", "is the root"),
        ("/proc/x", "under /proc"),
        ("/dev", "under /dev"),
    ],
)
def test_volume_guest_path_errors(tmp_path: Path, guest: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(volumes={guest: Volume.bind(tmp_path)})
    assert "volumes" in str(info.value) and needle in str(info.value)


def test_volume_duplicates_nesting_and_count(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"volumes.*'/data/' is given twice"):
        SandboxConfig(volumes={"/data": str(tmp_path), "/data/": str(tmp_path)})
    with pytest.raises(ConfigError, match="/data/sub is nested inside volume /data"):
        SandboxConfig(volumes={"/data/sub": str(tmp_path), "/data-x": str(tmp_path),
                               "/data": str(tmp_path)})  # fmt: skip
    four = {f"/v{i}": str(tmp_path) for i in range(MAX_VOLUMES)}
    assert len(SandboxConfig(volumes=four).volumes) == MAX_VOLUMES
    with pytest.raises(ConfigError, match=f"at most {MAX_VOLUMES}"):
        SandboxConfig(volumes={**four, "/one-more": str(tmp_path)})


def test_volume_host_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host_path.*does not exist: create it first"):
        Volume.bind(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"host_path.*is not a directory"):
        Volume.bind(tmp_path / "file")
    # Nested in a config, the error names the volume's field path too.
    with pytest.raises(ConfigError, match=r"volumes\./data\.host_path.*does not exist"):
        SandboxConfig(volumes={"/data": {"host_path": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="readonly"):
        SandboxConfig(volumes={"/data": {"host_path": str(tmp_path), "readonly": "perhaps"}})


def test_image_volume_errors(tmp_path: Path) -> None:
    image = tmp_path / "fs.erofs"
    image.write_bytes(b"\0" * 4096)
    volume = Volume.image(image)
    assert (volume.kind, volume.readonly, volume.fstype) == ("image", True, "erofs")
    with pytest.raises(ConfigError, match="does not exist: create it first"):
        Volume.image(tmp_path / "missing.erofs")
    with pytest.raises(ConfigError, match="is not a regular file: an image volume needs one"):
        Volume.image(tmp_path)
    with pytest.raises(ConfigError, match="fstype 'ext4,rw' is not a file-system name"):
        Volume.image(image, fstype="ext4,rw")
    with pytest.raises(ConfigError, match="image volumes are read-only: pass readonly=True"):
        SandboxConfig(volumes={"/a": {"kind": "image", "host_path": str(image)}})
    # One spare disk: one image, beside up to MAX_VOLUMES directories.
    binds = {f"/v{i}": str(tmp_path) for i in range(MAX_VOLUMES)}
    assert len(SandboxConfig(volumes={**binds, "/img": volume}).volumes) == MAX_VOLUMES + 1
    with pytest.raises(ConfigError, match="2 image volumes given, at most 1"):
        SandboxConfig(volumes={"/a": volume, "/b": volume})


# -- bad inputs of #19 (item 8): each a ConfigError naming the field ------------------------


def test_image_path_must_be_an_existing_directory(tmp_path: Path) -> None:
    missing = r"image: .*image directory '/nonexistent' does not exist"
    with pytest.raises(ConfigError, match=missing):
        SandboxConfig(image="/nonexistent")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match=r"image: .* neither a directory nor a disk image"):
        SandboxConfig(image=str(tmp_path / "fifo"))
    (tmp_path / "file").write_text("x")  # a regular file may be a disk image: checked at boot
    assert SandboxConfig(image=str(tmp_path / "file")).image == str(tmp_path / "file")
    with pytest.raises(ConfigError, match='image="host"'):
        SandboxConfig(image="/")
    assert SandboxConfig(image=str(tmp_path)).image == str(tmp_path)
    # Not path-like and nothing of that name here: left to the image resolver
    # (registry references come later).
    assert SandboxConfig(image="python:3.12-slim").image == "python:3.12-slim"


def test_stored_config_with_a_removed_image_directory_still_parses(tmp_path: Path) -> None:
    # A snapshot keeps its config as JSON; restoring it needs no image directory.
    (tmp_path / "root").mkdir()
    stored = SandboxConfig(image=str(tmp_path / "root")).to_json()
    (tmp_path / "root").rmdir()
    assert SandboxConfig.from_json(stored).image == str(tmp_path / "root")


@pytest.mark.parametrize(
    "field", ["boot_timeout", "exec_timeout", "stop_timeout", "request_timeout"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1.0, 0.0])
def test_timeouts_must_be_finite_and_positive(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {field}: ") as info:
        SandboxConfig(**{field: value})
    assert isinstance(info.value, ValueError)


def test_env_over_the_exec_limits_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"environment variable BIG is 200004 bytes.*MAX_ARG_STRLEN"
    ):
        SandboxConfig(env={"BIG": "x" * 200_000})
    many = {f"V{i}": "x" * 100_000 for i in range(12)}
    with pytest.raises(ConfigError, match="limit of one exec request"):
        SandboxConfig(env=many)
    assert SandboxConfig(env={"OK": "x" * 100_000}).env["OK"]


def test_output_limits_default_and_validate() -> None:
    config = SandboxConfig()
    assert config.max_output_bytes == 64 << 20 and config.max_read_bytes == 64 << 20
    assert config.on_output_limit == "raise"
    with pytest.raises(ConfigError, match="max_output_bytes"):
        SandboxConfig(max_output_bytes=-1)
    with pytest.raises(ConfigError, match="on_output_limit"):
        SandboxConfig(on_output_limit="ignore")


def _host_memory_mib() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) + int(info["SwapTotal"].split()[0])) // 1024


def test_memory_beyond_the_host_is_named_before_qemu_starts() -> None:
    if _host_memory_mib() >= 65536:
        pytest.skip("this host has 64 GiB or more")
    config = SandboxConfig(memory=65536)  # valid anywhere as a config...
    with pytest.raises(ConfigError, match=r"memory=65536 MiB is more than this host has: \d+ MiB"):
        config.check_host_capacity()  # ...but not on this host
    SandboxConfig(memory=512).check_host_capacity()


def test_memory_beyond_the_host_fails_create_without_a_vm() -> None:
    import anyio

    from pytest_microsandbox.runtime import Sandbox

    if _host_memory_mib() >= 65536:
        pytest.skip("this host has 64 GiB or more")

    async def main() -> None:
        with pytest.raises(ConfigError, match="memory=65536"):
            await Sandbox.create(SandboxConfig(memory=65536, cold_boot=True))

    anyio.run(main)


def test_cpus_beyond_the_host_are_allowed() -> None:
    import os

    # Virtual CPUs share the host's cores: a 2-vCPU marked test runs on 1 core.
    SandboxConfig(cpus=(os.cpu_count() or 1) + 1).check_host_capacity()
