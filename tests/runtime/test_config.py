"""SandboxConfig: validation names the field, JSON round-trips, no boot needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig
from pytest_microsandbox.runtime.config import ACCEL_ENV, find_project_root


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
