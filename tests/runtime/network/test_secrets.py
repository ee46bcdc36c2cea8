"""Secret placeholders and their substitution in relayed bytes (no VM)."""

from __future__ import annotations

import pytest

from pytest_microsandbox.runtime import ConfigError, SandboxConfig
from pytest_microsandbox.runtime.network import Secret, SecretSubstituter
from pytest_microsandbox.runtime.network._secrets import SubstitutionError

VALUE = "sk-live-0123456789abcdefghij"


def substituter() -> SecretSubstituter:
    return SecretSubstituter([Secret.env("API_KEY", value=VALUE, allow_hosts=["API.test"])])


def test_the_guest_sees_a_placeholder_as_long_as_the_value() -> None:
    sub = substituter()
    placeholder = sub.env()["API_KEY"]
    assert VALUE not in placeholder and len(placeholder) == len(VALUE)
    assert placeholder != substituter().env()["API_KEY"]  # random per sandbox


@pytest.mark.parametrize("split", [1, 5, 17, 40, 1000])
def test_substituted_for_an_allowed_host_across_chunk_boundaries(split: int) -> None:
    sub = substituter()
    placeholder = sub.env()["API_KEY"].encode()
    request = b"GET / HTTP/1.1\r\nAuthorization: Bearer " + placeholder + b"\r\n\r\n"
    rewriter = sub.stream("api.test")
    out = b"".join(rewriter.feed(request[i : i + split]) for i in range(0, len(request), split))
    out += rewriter.flush()
    assert out == request.replace(placeholder, VALUE.encode())
    assert rewriter.substituted == 1


def test_a_placeholder_to_another_host_is_a_violation() -> None:
    sub = substituter()
    rewriter = sub.stream("evil.test")
    with pytest.raises(SubstitutionError, match="API_KEY"):
        rewriter.feed(b"x" + sub.env()["API_KEY"].encode())
    assert sub.stream("evil.test").feed(b"no placeholder here") == b"no placeholder here"


def test_bad_secrets_name_the_field() -> None:
    with pytest.raises(ConfigError, match="allow_hosts"):
        Secret.env("API_KEY", value=VALUE, allow_hosts=[])
    with pytest.raises(ConfigError, match="env_var"):
        Secret.env("1BAD", value=VALUE, allow_hosts=["a.test"])
    secret = Secret.env("API_KEY", value=VALUE, allow_hosts=["a.test"])
    with pytest.raises(ConfigError, match="secrets need a network"):
        SandboxConfig(secrets=[secret])


def test_a_secret_is_never_serialized() -> None:
    secret = Secret.env("API_KEY", value=VALUE, allow_hosts=["a.test"])
    config = SandboxConfig(network="public-only", secrets=[secret])
    assert VALUE not in config.to_json() and VALUE not in repr(config)
    assert SandboxConfig.from_json(config.to_json()).secrets == ()


def test_a_restore_keeps_the_captured_placeholders_and_draws_the_rest() -> None:
    first = substituter().env()["API_KEY"]
    other = Secret.env("OTHER", value="v" * 30, allow_hosts=["other.test"])
    secret = Secret.env("API_KEY", value="a-new-value-of-another-length", allow_hosts=["api.test"])
    restored = SecretSubstituter([secret, other], {"API_KEY": first})
    assert restored.env()["API_KEY"] == first  # what the guest already holds
    assert restored.env()["OTHER"].startswith("MSB_")
    rewriter = restored.stream("api.test")
    assert rewriter.feed(first.encode()) + rewriter.flush() == b"a-new-value-of-another-length"
    # A kept placeholder that is not one of ours (a tampered snapshot): a fresh one.
    assert SecretSubstituter([secret], {"API_KEY": "a"}).env()["API_KEY"] != "a"
