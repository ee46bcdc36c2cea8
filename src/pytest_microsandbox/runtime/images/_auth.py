"""Registry credentials and the pull progress callback (no oras import here:
the configuration imports this module, and oras is only loaded for a pull).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, SecretStr

__all__ = ["ProgressCallback", "RegistryAuth"]

#: ``progress(what, done_bytes, total_bytes)``, called as blobs arrive; ``what``
#: names the blob (``"registry/repo:tag layer 2/5"``). A plain callable so the
#: plugin or a CLI can render it as a terminal line or a bar.
ProgressCallback = Callable[[str, int, int], None]


class RegistryAuth(BaseModel):
    """Credentials for a registry: a user name and password (sent as Basic, or
    exchanged for a bearer token when the registry asks for one), or a bearer
    token. Without any, ``~/.docker/config.json`` is read (oras does).
    Secrets never appear in a repr or a JSON dump.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
