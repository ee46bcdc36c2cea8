"""Build OCI test images from files and push them to a local registry with oras.

Everything here talks to 127.0.0.1 only: the registries are Debian's
``docker-registry`` started by the session fixtures in ``conftest.py``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import oras.provider
import requests

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    *("sh", "true", "ls", "cat", "echo", "id", "env", "pwd"),
    *("test", "stat", "dd", "df", "mkdir", "rm"),
)


@dataclass
class Entry:
    """One tar member: a file (``data``), a directory, a symlink or a hard link."""

    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0


def file(data: bytes | str, mode: int = 0o644, uid: int = 0) -> Entry:
    return Entry("file", data.encode() if isinstance(data, str) else data, mode, uid=uid, gid=uid)


def directory(mode: int = 0o755, uid: int = 0) -> Entry:
    return Entry("dir", mode=mode, uid=uid, gid=uid)


def symlink(target: str) -> Entry:
    return Entry("symlink", target=target, mode=0o777)


def layer_tar(entries: Mapping[str, Entry]) -> bytes:
    """A gzipped layer tar with ``entries`` (paths relative to /), parents added."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for name in sorted(entries):
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in seen and parent not in entries:
                    seen.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                    tar.addfile(info)
            seen.add(name)
            entry = entries[name]
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, 1700000000
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
                tar.addfile(info)
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return gzip.compress(raw.getvalue(), mtime=0)


def busybox_entries(extra_applets: tuple[str, ...] = ()) -> dict[str, Entry]:
    """A busybox userspace: /bin/busybox, applet links, /etc/passwd with user app (1234)."""
    out = {"bin/busybox": file(BUSYBOX.read_bytes(), 0o755)}
    for applet in (*APPLETS, *extra_applets):
        out[f"bin/{applet}"] = symlink("busybox")
    out["etc/passwd"] = file(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/home/app:/bin/sh\n"
    )
    out["etc/group"] = file("root:x:0:\napp:x:1234:\n")
    out["home/app"] = directory(0o755, uid=1234)
    return out


def image_config(
    *,
    env: list[str] | None = None,
    workdir: str = "",
    user: str = "",
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    arch: str = "amd64",
    diff_ids: list[str] | None = None,
) -> dict[str, object]:
    return {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/bin"],
            "WorkingDir": workdir,
            "User": user,
            "Entrypoint": entrypoint,
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids or []},
    }


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    """A running ``docker-registry`` on 127.0.0.1 (``user``/``password`` when protected)."""

    host: str
    process: subprocess.Popen[bytes]
    root: Path
    user: str | None = None
    password: str | None = None
    pushed: dict[str, str] = field(default_factory=dict)
    #: For a token-auth registry: a push+pull bearer token per repository.
    token_server: TokenServer | None = None

    def ref(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    def _client(self, repo: str = "") -> oras.provider.Registry:
        if self.token_server is not None:
            client = oras.provider.Registry(hostname=self.host, insecure=True)
            client.auth.set_token_auth(self.token_server.issue(repo, ["pull", "push"]))
            return client
        client = oras.provider.Registry(hostname=self.host, insecure=True, auth_backend="basic")
        if self.user is not None:
            client.auth.set_basic_auth(self.user, self.password or "")
        return client

    def _put(self, url: str, data: bytes, media_type: str) -> None:
        headers = {"Content-Type": media_type}
        auth = (self.user, self.password) if self.user is not None else None
        if self.token_server is not None:
            repo = url.split("/v2/", 1)[1].split("/manifests/", 1)[0]
            headers["Authorization"] = "Bearer " + self.token_server.issue(repo, ["pull", "push"])
            auth = None
        r = requests.put(url, data=data, headers=headers, auth=auth, timeout=30)
        assert r.status_code in (200, 201), (r.status_code, r.text)

    def push_blob(self, repo: str, data: bytes, media_type: str) -> dict[str, object]:
        """Upload one blob through oras; returns its descriptor."""
        client = self._client(repo)
        container = client.get_container(f"{self.host}/{repo}")
        descriptor: dict[str, object] = {
            "mediaType": media_type,
            "digest": _digest(data),
            "size": len(data),
        }
        with tempfile.NamedTemporaryFile() as tmp, client.session:
            tmp.write(data)
            tmp.flush()
            response = client.upload_blob(tmp.name, container, descriptor)
        assert response.status_code in (200, 201, 202), (response.status_code, response.text)
        return descriptor

    def push_image(
        self,
        repo_tag: str,
        layers: list[Mapping[str, Entry]] | list[bytes],
        config: dict[str, object] | None = None,
        *,
        tag: bool = True,
    ) -> str:
        """Push an image (layers bottom first); returns its manifest digest."""
        repo, _, tag_name = repo_tag.partition(":")
        blobs = [blob if isinstance(blob, bytes) else layer_tar(blob) for blob in layers]
        cfg = dict(config or image_config())
        cfg["rootfs"] = {"type": "layers", "diff_ids": [_digest(gzip.decompress(b)) for b in blobs]}
        descriptors = [self.push_blob(repo, b, LAYER_GZ) for b in blobs]
        cfg_desc = self.push_blob(repo, json.dumps(cfg).encode(), CONFIG)
        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg_desc, "layers": descriptors}
        ).encode()
        digest = _digest(manifest)
        self._put(f"http://{self.host}/v2/{repo}/manifests/{digest}", manifest, MANIFEST)
        if tag:
            self._put(
                f"http://{self.host}/v2/{repo}/manifests/{tag_name or 'latest'}", manifest, MANIFEST
            )
        return digest

    def push_index(self, repo_tag: str, entries: list[tuple[str, str]]) -> str:
        """Tag an index of ``(manifest digest, arch)`` entries (pushed before)."""
        repo, _, tag_name = repo_tag.partition(":")
        manifests = []
        for digest, arch in entries:
            r = requests.head(
                f"http://{self.host}/v2/{repo}/manifests/{digest}",
                headers={"Accept": MANIFEST},
                auth=(self.user, self.password) if self.user else None,
                timeout=30,
            )
            manifests.append(
                {
                    "mediaType": MANIFEST,
                    "digest": digest,
                    "size": int(r.headers["Content-Length"]),
                    "platform": {"architecture": arch, "os": "linux"},
                }
            )
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
        ).encode()
        self._put(f"http://{self.host}/v2/{repo}/manifests/{tag_name}", index, INDEX)
        return _digest(index)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TokenServer:
    """A bearer-token issuer on 127.0.0.1 for a registry in token mode: Basic
    credentials in, a JWT (RS256, x5c header) signed by a self-signed key out.
    """

    SERVICE = "msb-test-registry"
    ISSUER = "msb-test-issuer"

    def __init__(self, root: Path, user: str, password: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "msb-test-token")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = root / "token.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                expected = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    self.send_response(401)
                    self.end_headers()
                    return
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                scope = (query.get("scope") or ["repository::pull"])[0]
                _, repo, actions = scope.split(":")
                body = json.dumps({"token": server.issue(repo, actions.split(","))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def issue(self, repo: str, actions: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.ISSUER, "sub": self.user, "aud": self.SERVICE, "exp": now + 600,
            "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
            "access": [{"type": "repository", "name": repo, "actions": actions}],
        }  # fmt: skip
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@contextlib.contextmanager
def run_registry(
    user: str | None = None, password: str | None = None, *, token: bool = False
) -> Iterator[Registry]:
    """Start ``docker-registry`` on a free 127.0.0.1 port with temp storage; kill it after."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed: run ./scripts/setup")
    root = Path(tempfile.mkdtemp(prefix="msb-registry-"))
    try:
        auth = ""
        token_server = None
        if token:
            token_server = TokenServer(root, user or "", password or "")
            auth = (
                f"auth:\n  token:\n    realm: {token_server.realm}\n"
                f"    service: {TokenServer.SERVICE}\n    issuer: {TokenServer.ISSUER}\n"
                f"    rootcertbundle: {token_server.cert_path}\n"
            )
        elif user is not None:
            line = subprocess.run(
                ["htpasswd", "-Bbn", user, password or ""],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            (root / "htpasswd").write_text(line + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        for _attempt in range(5):
            port = free_port()
            (root / "config.yml").write_text(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
            )
            with open(root / "log", "wb") as log:
                proc = subprocess.Popen(
                    [binary, "serve", os.fspath(root / "config.yml")],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            deadline = time.monotonic() + 20
            up = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                    up = True
                    break
                except requests.exceptions.ConnectionError:
                    time.sleep(0.05)
            if up:
                break
            proc.kill()
            proc.wait()
        else:
            raise RuntimeError(
                f"docker-registry did not start: {(root / 'log').read_text()[-2000:]}"
            )
        try:
            yield Registry(
                f"127.0.0.1:{port}", proc, root, user, password, token_server=token_server
            )
        finally:
            proc.kill()
            proc.wait()
            if token_server is not None:
                token_server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_oci_layout(
    root: Path, layers: list[Mapping[str, Entry]], config: dict[str, object]
) -> str:
    """An OCI image layout directory holding one image; returns its manifest digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = _digest(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    descs = [put(layer_tar(layer), LAYER_GZ) for layer in layers]
    cfg = put(json.dumps(config).encode(), CONFIG)
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": descs}
    ).encode()
    mdesc = put(manifest, MANIFEST)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return str(mdesc["digest"])


def write_docker_archive(
    path: Path, layers: list[Mapping[str, Entry]], config: dict[str, object]
) -> None:
    """A ``docker save`` style archive (manifest.json, uncompressed layer tars)."""
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        names = []
        for i, layer in enumerate(layers):
            name = f"layer{i}/layer.tar"
            add(name, gzip.decompress(layer_tar(layer)))
            names.append(name)
        cfg = json.dumps(config).encode()
        cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
        add(cfg_name, cfg)
        add(
            "manifest.json",
            json.dumps([{"Config": cfg_name, "RepoTags": ["t:1"], "Layers": names}]).encode(),
        )


def debian_layer(cache: Path) -> bytes:
    """One gzipped layer merging the Debian packages ``scripts/setup`` downloaded
    (a real distribution userspace: libc, dash, coreutils, Python 3.11), built
    once and cached across runs in ``<cache>/test-images``.
    """
    debs = sorted((cache / "test-debs").glob("*.deb"))
    if len(debs) < 10:
        raise RuntimeError(
            f"the test packages are missing in {cache / 'test-debs'}: run ./scripts/setup"
        )
    key = hashlib.sha256("\n".join(d.name for d in debs).encode()).hexdigest()[:16]
    out = cache / "test-images" / f"debian-{key}.tar.gz"
    if out.exists():
        return out.read_bytes()
    raw = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as merged:
        for deb in debs:
            fsys = subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
            )
            with tarfile.open(fileobj=io.BytesIO(fsys.stdout)) as tar:
                for member in tar:
                    name = member.name.lstrip("./")
                    if not name or name in seen:
                        continue
                    seen.add(name)
                    member.name = name
                    merged.addfile(member, tar.extractfile(member) if member.isfile() else None)
        for name, target in (("bin/sh", "dash"), ("usr/bin/python3", "python3.11")):
            if name not in seen:
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
                merged.addfile(info)
    data = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(out)
    return data
