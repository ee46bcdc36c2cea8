"""Secrets that never enter the guest: the guest sees a placeholder, the host
puts the real value into traffic to the secret's allowed hosts only.

The placeholder is random per sandbox and as long as the value (at least 24
characters), so substituting it keeps HTTP lengths right. A flow to any other
host that carries a placeholder is closed and logged. Substitution works on
the bytes the host relays: plain TCP, and TLS once the host intercepts it
with its per-cache CA (``_tls.py``). A restore keeps the snapshot's
placeholders (recorded in its metadata, never the values) and takes the
values again from its caller.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .._exceptions import ConfigError
from ._policy import normalize_name

__all__ = ["Secret", "SecretSubstituter", "SubstitutionError"]

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ALPHABET = string.ascii_letters + string.digits
_MIN_PLACEHOLDER = 24
_PLACEHOLDER_RE = re.compile(rf"^MSB_[A-Za-z0-9]{{{_MIN_PLACEHOLDER - 4},4096}}$")


class Secret(BaseModel):
    """A secret the guest knows only as a placeholder in ``env_var``.

    ``Secret.env("API_KEY", value=os.environ["API_KEY"], allow_hosts=["api.test"])``.
    The value is never serialized (``to_json`` masks it): a stored config or
    snapshot does not carry it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_var: str = Field(description="environment variable holding the placeholder")
    value: SecretStr = Field(description="the real value, substituted on the host")
    allow_hosts: tuple[str, ...] = Field(description="host names it may be sent to")

    @field_validator("env_var")
    @classmethod
    def _check_env(cls, value: str) -> str:
        if not _ENV_RE.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw or raw == "**********":
            raise ValueError(
                "is empty or masked (a secret is not stored in a serialized config): "
                "pass the real value"
            )
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(
                "names no host: a secret must list the hosts it may be sent to "
                '(allow_hosts=["api.test"])'
            )
        return tuple(normalize_name(h) for h in value)

    @classmethod
    def env(cls, env_var: str, *, value: str, allow_hosts: list[str] | tuple[str, ...]) -> Secret:
        """:raises ConfigError: a field is invalid (it is named)."""
        from pydantic import ValidationError

        try:
            return cls(env_var=env_var, value=SecretStr(value), allow_hosts=tuple(allow_hosts))
        except ValidationError as exc:
            lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"invalid Secret {env_var!r}: " + "; ".join(lines)) from None


class SubstitutionError(Exception):
    """A placeholder is on its way to a host its secret does not allow."""


class SecretSubstituter:
    """Placeholders of one sandbox and the rewriting of one direction of a flow.

    ``placeholders`` (env var -> placeholder) are reused instead of drawn: a
    sandbox restored from a snapshot or forked keeps its capture's, which
    processes and files in the guest already hold.
    """

    def __init__(
        self,
        items: tuple[Secret, ...] | list[Secret],
        placeholders: Mapping[str, str] | None = None,
    ) -> None:
        self.secrets = tuple(items)
        self.placeholders: dict[str, bytes] = {}
        for secret in self.secrets:
            kept = (placeholders or {}).get(secret.env_var)
            # A kept placeholder must look like one we drew: a short or common
            # string would be "substituted" wherever it happens to appear.
            if kept is not None and _PLACEHOLDER_RE.match(kept):
                self.placeholders[secret.env_var] = kept.encode()
                continue
            size = max(_MIN_PLACEHOLDER, len(secret.value.get_secret_value().encode()))
            token = "".join(secrets.choice(_ALPHABET) for _ in range(size - 4))
            self.placeholders[secret.env_var] = ("MSB_" + token).encode()

    def env(self) -> dict[str, str]:
        """The guest's view: each variable holds its placeholder."""
        return {name: p.decode() for name, p in self.placeholders.items()}

    def stream(self, host: str | None) -> _Rewriter:
        """A rewriter for bytes going from the guest to ``host``."""
        name = normalize_name(host) if host else None
        rules: list[tuple[bytes, bytes | None, str]] = []
        for secret in self.secrets:
            placeholder = self.placeholders[secret.env_var]
            value = secret.value.get_secret_value().encode()
            allowed = name is not None and name in secret.allow_hosts
            rules.append((placeholder, value if allowed else None, secret.env_var))
        return _Rewriter(rules)


class _Rewriter:
    """Replaces placeholders across chunk boundaries (keeps a tail back)."""

    def __init__(self, rules: list[tuple[bytes, bytes | None, str]]) -> None:
        self._rules = rules
        self._keep = max((len(p) for p, _, _ in rules), default=1) - 1
        self._tail = b""
        self.substituted = 0

    def feed(self, data: bytes) -> bytes:
        """Rewrite a chunk; returns what may be sent now.

        :raises SubstitutionError: a placeholder of a secret not allowed here.
        """
        buf = self._tail + data
        for placeholder, value, env_var in self._rules:
            if placeholder in buf:
                if value is None:
                    raise SubstitutionError(
                        f"the placeholder of secret {env_var} was sent to a host it does not allow"
                    )
                self.substituted += buf.count(placeholder)
                buf = buf.replace(placeholder, value)
        if self._keep <= 0 or not self._rules:
            self._tail = b""
            return buf
        # Hold back what could be the start of a placeholder split across chunks.
        cut = len(buf)
        for placeholder, _, _ in self._rules:
            for k in range(min(len(placeholder) - 1, len(buf)), 0, -1):
                if buf.endswith(placeholder[:k]):
                    cut = min(cut, len(buf) - k)
                    break
        self._tail = buf[cut:]
        return buf[:cut]

    def flush(self) -> bytes:
        out, self._tail = self._tail, b""
        return out
