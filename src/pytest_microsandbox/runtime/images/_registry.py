"""Talk to an OCI distribution registry through the ``oras`` client.

``oras.provider.Registry`` does the URL building, the docker config lookup
(``~/.docker/config.json``, credential helpers) and the bearer-token dance;
this module adds what an image pull needs on top: errors that say what went
wrong and how to fix it (oras raises ``ValueError`` or retries with sleeps
of up to 81 s on a refused connection), Basic challenges answered with the
credentials given, timeouts, manifest media types of images and indexes, and
blob downloads checked against their digest and size.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import oras.auth
import oras.provider
import requests

from .._exceptions import (
    ImageError,
    ImageNotFoundError,
    RegistryAuthError,
    RegistryUnreachableError,
)
from ._auth import ProgressCallback, RegistryAuth
from ._oci import INDEX_TYPES, MAX_MANIFEST_BYTES
from ._reference import ImageReference

__all__ = [
    "MANIFEST_TYPES",
    "RegistryClient",
]

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
#: Seconds to connect and between bytes of an answer.
TIMEOUT_S = 30.0
_CHUNK = 1 << 20


class _OrasRegistry(oras.provider.Registry):  # type: ignore[misc]
    """oras' registry with one bounded try per request: no retry loop with
    sleeps (a refused connection must fail at once), a timeout, and Basic
    challenges answered with our credentials.
    """

    basic: str | None = None

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: dict[str, Any] | bytes | None = None,
        headers: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        headers = dict(headers or {})
        if isinstance(self.auth, oras.auth.TokenAuth) and self.auth.token is not None:
            headers.update(self.auth.get_auth_header())

        def send(h: dict[str, str]) -> requests.Response:
            response: requests.Response = self.session.request(
                method,
                url,
                data=data,
                json=json,
                headers=h,
                stream=stream,
                verify=self._tls_verify,
                timeout=TIMEOUT_S,
            )
            return response

        response = send(headers)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("Www-Authenticate", "")
        if challenge.lower().startswith("basic"):
            basic = self.basic or getattr(self.auth, "_basic_auth", None)
            if not basic:
                return response
            return send({**headers, "Authorization": f"Basic {basic}"})
        retry, changed = self.auth.authenticate_request(response, headers)
        if not changed:
            return response
        return send(retry)


class RegistryClient:
    """One registry, one repository's worth of requests (thread-confined)."""

    def __init__(self, ref: ImageReference, auth: RegistryAuth | None = None) -> None:
        self.ref = ref
        # Loopback registries speak plain HTTP (what a test registry does);
        # anything else is HTTPS with verification.
        self._oras = _OrasRegistry(hostname=ref.registry, insecure=ref.is_loopback)
        self._container = self._oras.get_container(f"{ref.registry}/{ref.repository}")
        self._explicit = auth is not None and (auth.username or auth.token) is not None
        if auth is not None and auth.token is not None:
            self._oras.auth.set_token_auth(auth.token.get_secret_value())
        elif auth is not None and auth.username is not None:
            password = auth.password.get_secret_value() if auth.password else ""
            self._oras.auth.set_basic_auth(auth.username, password)
            self._oras.basic = base64.b64encode(f"{auth.username}:{password}".encode()).decode()
        else:
            # ~/.docker/config.json (and its credential helpers), as docker does.
            try:
                self._oras.auth.load_configs(self._container)
            except (OSError, ValueError) as exc:
                raise ImageError(
                    f"cannot read the docker config for {ref.registry}: {exc}; fix "
                    "~/.docker/config.json or pass RegistryAuth explicitly"
                ) from exc

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self._oras.session.close()

    # -- requests ------------------------------------------------------------------------------

    def _url(self, kind: str, what: str) -> str:
        return f"{self._oras.prefix}://{self.ref.registry}/v2/{self.ref.repository}/{kind}/{what}"

    def _request(self, url: str, *, accept: str | None = None, stream: bool = False) -> Any:
        headers = {"Accept": accept} if accept else {}
        try:
            response = self._oras.do_request(url, "GET", headers=headers, stream=stream)
        except requests.exceptions.SSLError as exc:
            raise RegistryUnreachableError(
                f"TLS to registry {self.ref.registry} failed: {exc}; check its certificate "
                "(plain HTTP is used for 127.0.0.1/localhost registries only)"
            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise RegistryUnreachableError(
                f"registry {self.ref.registry} is unreachable ({type(exc).__name__}): check "
                "that it runs and that the host and port in the image reference are right"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise RegistryUnreachableError(
                f"request to registry {self.ref.registry} failed: {exc}"
            ) from exc
        except ValueError as exc:  # oras' own errors (bad challenges, token answers)
            raise RegistryAuthError(
                f"authenticating to registry {self.ref.registry} failed: {exc}; check the "
                "credentials (RegistryAuth or ~/.docker/config.json)"
            ) from exc
        self._check(response)
        return response

    def _check(self, response: Any) -> None:
        status = response.status_code
        if status in (401, 403):
            response.close()
            if self._explicit:
                raise RegistryAuthError(
                    f"registry {self.ref.registry} refused the credentials for "
                    f"{self.ref.repository} (HTTP {status}): check the user name and "
                    "password (or token) passed in RegistryAuth"
                )
            raise RegistryAuthError(
                f"registry {self.ref.registry} requires credentials for {self.ref.repository} "
                f"(HTTP {status}): pass registry_auth=RegistryAuth(username=..., password=...) "
                "or log in so that ~/.docker/config.json has them"
            )
        if status == 404:
            response.close()
            raise ImageNotFoundError(
                f"image {self.ref} not found in registry {self.ref.registry} (HTTP 404): "
                "check the repository name and the tag or digest"
            )
        if status != 200:
            response.close()
            raise ImageError(
                f"registry {self.ref.registry} answered HTTP {status} for {self.ref}; "
                "check the registry's logs, or try again"
            )

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """Fetch a manifest or index by tag or digest: ``(raw bytes, media type)``.

        The bytes are returned raw: their SHA-256 is the image's digest.
        """
        accept = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
        response = self._request(self._url("manifests", reference), accept=accept, stream=True)
        with response:
            body = _read_bounded(response, MAX_MANIFEST_BYTES, f"manifest {reference}")
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return body, media_type

    def download_blob(
        self,
        digest: str,
        size: int,
        dest: Path,
        *,
        progress: ProgressCallback | None = None,
        label: str = "",
    ) -> None:
        """Download blob ``digest`` into ``dest``, checking its size and SHA-256.

        :raises ImageError: the registry sent other bytes than the digest names.
        """
        response = self._request(self._url("blobs", digest), stream=True)
        hasher = hashlib.sha256()
        done = 0
        with response, open(dest, "wb") as out:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                done += len(chunk)
                if done > size:
                    raise ImageError(
                        f"registry {self.ref.registry} sent more than the {size} bytes "
                        f"announced for blob {digest}; the registry is broken or hostile"
                    )
                hasher.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(label or digest, done, size)
            out.flush()
            os.fsync(out.fileno())
        if done != size or f"sha256:{hasher.hexdigest()}" != digest:
            raise ImageError(
                f"blob {digest} from {self.ref.registry} does not match its digest "
                f"({done} of {size} bytes): try again; if it persists the registry is broken"
            )


def _read_bounded(response: Any, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_content(chunk_size=65536):
        total += len(chunk)
        if total > limit:
            raise ImageError(f"{what} is larger than {limit} bytes: refused")
        parts.append(chunk)
    return b"".join(parts)
