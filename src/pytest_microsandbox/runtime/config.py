"""Sandbox configuration: pydantic models that validate, inspect and round-trip
through JSON without booting anything.
"""

from __future__ import annotations

import os
import posixpath
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ._exceptions import ConfigError, ImageError
from ._limits import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_READ_BYTES,
    MAX_ARG_STRLEN,
    OnOutputLimit,
)
from ._named_volumes import NamedVolumeInfo
from .accel import ACCEL_ENV, AccelChoice, env_accel_choice
from .agent.protocol import MAX_FRAME, MIN_FRAME
from .images._auth import RegistryAuth
from .images._patches import SCRIPTS_DIR, Patch
from .images._reference import parse_reference
from .network._policy import NetworkPolicy, normalize_name
from .network._ports import parse_port_key
from .network._secrets import Secret

__all__ = [
    "ACCEL_ENV",
    "MAX_IMAGE_VOLUMES",
    "MAX_VOLUMES",
    "AccelChoice",
    "SandboxConfig",
    "Volume",
    "find_project_root",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")

#: Bind volumes per sandbox. A template for sandboxes with bind volumes carries
#: this many spare 9p devices (tags ``msb.vol0`` ...), so a clone can bind its
#: volumes after restore; other templates carry none (see ``volume_slots``).
MAX_VOLUMES = 4
#: Image volumes per sandbox: templates carry one spare virtio-blk disk.
MAX_IMAGE_VOLUMES = 1
_FSTYPE_RE = re.compile(r"^[a-z0-9_.]{1,32}$")
#: Guest paths a volume may not cover: the agent and every exec rely on them.
_SCRIPT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RESERVED_GUEST_PATHS = ("/proc", "/sys", "/dev")
#: Set while :meth:`SandboxConfig.from_json` parses a stored config. A context
#: variable, not pydantic's validation context: the custom ``__init__`` that
#: pydantic calls during validation does not pass that on.
_PARSING_STORED: ContextVar[bool] = ContextVar("_PARSING_STORED", default=False)


def _format_validation_error(model: str, exc: ValidationError) -> str:
    lines = [f"invalid {model}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _inner_config_error(exc: ValidationError) -> ConfigError | None:
    """The ConfigError that a model's own ``__init__`` raised during validation, if
    that is all ``exc`` says (pydantic wraps it as a root "Value error").
    """
    errors = exc.errors()
    if len(errors) == 1 and not errors[0]["loc"]:
        inner = errors[0].get("ctx", {}).get("error")
        if isinstance(inner, ConfigError):
            return inner
    return None


def find_project_root(start: Path | None = None) -> Path | None:
    """Return the nearest ancestor of ``start`` (default: cwd) that looks like a
    project (has pyproject.toml, setup.py, setup.cfg or .git), else None.
    The home directory and ``/`` never count: they are not imaged wholesale.
    """
    here = (start or Path.cwd()).resolve()
    home = Path.home().resolve()
    for candidate in (here, *here.parents):
        if candidate in (home, Path("/")):
            return None
        if any((candidate / m).exists() for m in _PROJECT_MARKERS):
            return candidate
    return None


class Volume(BaseModel):
    """A host directory (microsandbox's ``Volume.bind``) or a file-system image
    file (:meth:`image`) mounted in the guest.

    Used as the values of :attr:`SandboxConfig.volumes`, keyed by guest path::

        SandboxConfig(volumes={"/data": Volume.bind("/srv/data", readonly=True),
                               "/assets": Volume.image("assets.erofs")})

    A bare path string is accepted as a read-write bind. The guest sees a
    directory through virtio-9p: ``readonly`` is enforced by QEMU (the share is
    exported read-only) and by the guest mount (``ro``). An image is the
    template's spare virtio-blk disk, always read-only (QEMU opens the file
    read-only), so one per sandbox.

    :meth:`bind`, :meth:`image` (and :class:`SandboxConfig`) raise
    :class:`ConfigError` naming the bad field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bind", "image", "named", "tmpfs"] = "bind"
    host_path: Path | None = Field(
        default=None,
        description="existing host directory, or image file for kind='image', or the "
        "volume's directory for kind='named' (stored absolute, symlinks resolved); "
        "None for tmpfs",
    )
    readonly: bool = Field(False, description="refuse guest writes (host and guest side)")
    fstype: str = Field(
        "erofs", description="file system of an image (erofs, ext4, ...); unused by binds"
    )
    name: str | None = Field(default=None, description="a named volume's name")
    quota_mb: int | None = Field(default=None, ge=1, description="a named volume's MiB")
    size_mb: int | None = Field(default=None, ge=1, description="a tmpfs volume's MiB")

    # No __init__ override (unlike SandboxConfig): pydantic would call it for
    # nested values too, and the error would lose its field path
    # (volumes./data.host_path). Construct through bind() to get ConfigError.

    @classmethod
    def bind(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> Volume:
        """Mount the host directory ``path`` (read-write unless ``readonly``).

        :raises ConfigError: ``path`` does not exist or is not a directory.
        """
        try:
            return cls(host_path=Path(path), readonly=readonly, fstype="erofs")
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("Volume", exc)) from None

    @classmethod
    def image(cls, path: str | os.PathLike[str], *, fstype: str = "erofs") -> Volume:
        """Mount the file-system image file ``path`` read-only (``fstype``: its
        file system, as the guest kernel names it).

        :raises ConfigError: ``path`` does not exist or is not a regular file.
        """
        try:
            return cls(kind="image", host_path=Path(path), readonly=True, fstype=fstype)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("Volume", exc)) from None

    @classmethod
    def named(
        cls,
        name: str,
        *,
        quota_mb: int = 256,
        readonly: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Volume:
        """A volume that persists across sandboxes and runs, by ``name``: an ext4
        disk of ``quota_mb`` MiB (created on first use) in the cache directory.
        A full volume gives the guest ENOSPC. One sandbox mounts it at a time.

        :raises ConfigError: bad name or quota, or it exists with another quota.
        """
        from ._named_volumes import create_named_volume

        path = create_named_volume(
            name, quota_mb, Path(cache_dir) if cache_dir is not None else None
        )
        try:
            return cls(
                kind="named", host_path=path, name=name, quota_mb=quota_mb, readonly=readonly,
                fstype="ext4",
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("Volume", exc)) from None

    @classmethod
    def tmpfs(cls, size_mb: int = 64) -> Volume:
        """A tmpfs of at most ``size_mb`` MiB (guest RAM, gone with the sandbox)."""
        try:
            return cls(kind="tmpfs", size_mb=size_mb, fstype="tmpfs", readonly=False)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("Volume", exc)) from None

    @staticmethod
    def list(cache_dir: str | os.PathLike[str] | None = None) -> list[NamedVolumeInfo]:
        """The named volumes in the cache: name, quota, bytes used, last use."""
        from ._named_volumes import list_named_volumes

        return list_named_volumes(Path(cache_dir) if cache_dir is not None else None)

    @staticmethod
    def remove(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
        """Delete named volume ``name`` and its data; False if it did not exist.

        :raises FilesystemError: a running sandbox uses it.
        """
        from ._named_volumes import remove_named_volume

        return remove_named_volume(name, Path(cache_dir) if cache_dir is not None else None)

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        if isinstance(data, (str, os.PathLike)):
            return {"host_path": data}
        return data

    @field_validator("host_path")
    @classmethod
    def _check_host_path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if "\0" in str(value):
            raise ValueError("contains a NUL byte")
        try:
            resolved = value.expanduser().resolve(strict=True)
        except FileNotFoundError:
            raise ValueError(
                f"host path {str(value)!r} does not exist: create it first "
                "(volumes bind existing directories or image files)"
            ) from None
        except OSError as exc:
            raise ValueError(f"cannot resolve host path {str(value)!r}: {exc}") from None
        return resolved

    @model_validator(mode="after")
    def _check_kind(self) -> Volume:
        if self.kind == "tmpfs":
            if self.host_path is not None or self.size_mb is None:
                raise ValueError("a tmpfs volume has a size_mb and no host_path")
            return self
        if self.host_path is None:
            raise ValueError(f"a {self.kind} volume needs a host_path")
        if self.kind == "named":
            if not self.name or not self.quota_mb or not self.host_path.is_dir():
                raise ValueError("a named volume needs its name, quota_mb and directory")
            return self
        path = str(self.host_path)
        if self.kind == "bind" and not self.host_path.is_dir():
            raise ValueError(
                f"{path!r} is not a directory: a bind volume binds a host directory "
                "(use Volume.image for a file-system image; copy single files in with "
                "sandbox.fs().copy_from_host)"
            )
        if self.kind == "image":
            if not self.host_path.is_file():
                raise ValueError(f"{path!r} is not a regular file: an image volume needs one")
            if not self.readonly:
                raise ValueError("image volumes are read-only: pass readonly=True")
            if not _FSTYPE_RE.match(self.fstype):
                raise ValueError(f"fstype {self.fstype!r} is not a file-system name")
        return self


def _count_binds(volumes: dict[str, Volume]) -> int:
    # Named volumes ride on a 9p device too (their disk image's directory).
    return sum(1 for v in volumes.values() if v.kind in ("bind", "named"))


def _normalize_guest_path(raw: str) -> str:
    if "\0" in raw:
        raise ValueError(f"guest path {raw!r} contains a NUL byte")
    if not raw.startswith("/"):
        raise ValueError(f"guest path {raw!r} must be absolute (start with '/')")
    path = "/" + posixpath.normpath(raw).lstrip("/")
    if path == "/":
        raise ValueError(f"guest path {raw!r} is the root: mount a volume on a subdirectory")
    for reserved in _RESERVED_GUEST_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(
                f"guest path {raw!r} is under {reserved}, which the guest agent needs: "
                "choose another directory"
            )
    return path


class Image(BaseModel):
    """An image with its options, for :attr:`SandboxConfig.image`::

        SandboxConfig(image=Image.oci("127.0.0.1:5000/team/app:1.4", pull_policy="never"))
        SandboxConfig(image=Image.disk("alpine.qcow2", fstype="ext4"))

    A plain string works too (``"host"``, a directory or disk image path, an
    OCI reference); this form carries the options that go with it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    pull_policy: Literal["always", "if-missing", "never"] | None = None
    fstype: Literal["auto", "ext4", "ext3", "ext2", "erofs"] | None = None

    @classmethod
    def oci(
        cls, reference: str, *, pull_policy: Literal["always", "if-missing", "never"] | None = None
    ) -> Image:
        """An OCI image by reference (``registry/repo:tag`` or ``...@sha256:...``).

        :raises ConfigError: an option is invalid.
        """
        return cls._make(source=reference, pull_policy=pull_policy)

    @classmethod
    def disk(
        cls,
        path: str | os.PathLike[str],
        *,
        fstype: Literal["auto", "ext4", "ext3", "ext2", "erofs"] = "auto",
    ) -> Image:
        """A disk image file (raw, qcow2, vmdk) whose file system becomes ``/``;
        never written (each sandbox writes into its own overlay).

        :raises ConfigError: an option is invalid.
        """
        return cls._make(source=os.fspath(Path(path).expanduser().resolve()), fstype=fstype)

    @classmethod
    def _make(cls, **fields: Any) -> Image:
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("Image", exc)) from None

    def config_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.source}
        if self.pull_policy is not None:
            out["pull_policy"] = self.pull_policy
        if self.fstype is not None:
            out["disk_fstype"] = self.fstype
        return out


class SandboxConfig(BaseModel):
    """How to build and run one sandbox.

    Construction raises :class:`ConfigError` naming each bad field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = Field("sandbox", description="sandbox name; also the guest hostname")
    image: str = Field(
        "host",
        description='root filesystem: "host" (the host userspace, same Python and venv), '
        "a path to a local directory, or an OCI image reference "
        '("registry:5000/team/app:1.4", "...@sha256:...")',
    )
    disk_fstype: Literal["auto", "ext4", "ext3", "ext2", "erofs"] = Field(
        "auto",
        description="disk images: the root file system (auto: read from a raw image's "
        "superblock, else tried by the guest)",
    )
    pull_policy: Literal["always", "if-missing", "never"] = Field(
        "if-missing",
        description='OCI images: "if-missing" uses the pinned digest and local layers when '
        'present; "always" resolves the tag again; "never" uses only the local store',
    )
    patches: tuple[Patch, ...] = Field(
        (),
        description="changes to the guest root applied before boot, in a layer of their "
        "own (Patch.text/append/copy_dir/symlink/mkdir); the image is never modified",
    )
    scripts: dict[str, str] = Field(
        default_factory=dict,
        description=f"executable scripts by name, installed in {SCRIPTS_DIR} (on every "
        "exec's PATH)",
    )
    registry_auth: RegistryAuth | None = Field(
        None,
        exclude=True,
        description="OCI images: registry credentials (None: ~/.docker/config.json); "
        "never written to JSON",
    )
    cpus: int = Field(1, ge=1, le=64, description="virtual CPUs")
    memory: int = Field(512, ge=128, le=65536, description="guest memory in MiB")
    env: dict[str, str] = Field(default_factory=dict, description="environment for every exec")
    workdir: str = Field("/", description="working directory of execs (absolute guest path)")
    shell: str = Field("/bin/sh", description="shell used by Sandbox.shell()")
    user: str | None = Field(None, description="default exec user (name, uid or uid:gid)")
    project_root: Path | None = Field(
        None,
        description='project directory imaged into the guest with image="host" '
        "(default: the nearest ancestor of cwd with pyproject.toml/setup.py/.git)",
    )
    image_project: bool = Field(
        True,
        description='with image="host", image the project\'s own files into the guest '
        "root; False leaves them out (trees inside the project that have their own layer, "
        "such as its venv, stay) for callers that copy the project in after a restore",
    )
    accel: AccelChoice | None = Field(
        None, description=f"accelerator; None reads ${ACCEL_ENV}, else auto"
    )
    boot_timeout: float = Field(
        120.0, gt=0, allow_inf_nan=False, description="seconds to reach the agent"
    )
    exec_timeout: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="default timeout of each exec in seconds (None: none)",
    )
    stop_timeout: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="graceful stop before a forced kill"
    )
    request_timeout: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds the agent may take to answer a non-exec request",
    )
    max_output_bytes: int = Field(
        DEFAULT_MAX_OUTPUT_BYTES,
        ge=0,
        description="stdout and stderr, together, that exec() collects in host memory "
        "(default 64 MiB); exec_stream's events are not limited",
    )
    on_output_limit: OnOutputLimit = Field(
        "raise",
        description='past max_output_bytes: "raise" kills the command and raises '
        'OutputLimitError; "truncate" keeps the first bytes, drops the rest while the '
        "command runs on, and sets ExecOutput.truncated",
    )
    max_read_bytes: int = Field(
        DEFAULT_MAX_READ_BYTES,
        ge=0,
        description="largest guest file fs().read returns (default 64 MiB); bigger ones "
        "raise OutputLimitError: copy them with fs().copy_to_host",
    )
    volumes: dict[str, Volume] = Field(
        default_factory=dict,
        description="host directories mounted in the guest, keyed by absolute guest path: "
        f"{{'/data': Volume.bind('/host/dir', readonly=True)}}; at most {MAX_VOLUMES}",
    )
    volume_slots: int | None = Field(
        None,
        ge=0,
        le=MAX_VOLUMES,
        description="spare 9p devices the sandbox's template carries for bind volumes "
        f"(None: {MAX_VOLUMES} if volumes has a bind volume, else 0). Each costs a VM "
        "~1.2 MiB of host memory. Set it to snapshot a sandbox created without volumes "
        "whose restores bind some: Sandbox.restore(name, volumes=...) needs the slots",
    )
    max_duration: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="seconds after which the host stops the sandbox, whatever runs "
        "(None: no limit); a host timer, the guest cannot extend it",
    )
    idle_timeout: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="seconds without a call from the host (commands, files, metrics) "
        "after which the host stops the sandbox (None: never); paused time counts as idle",
    )
    network: NetworkPolicy | None = Field(
        None,
        description="the guest's network: None (the default) gives it none (eth0 stays "
        "down, nothing listens behind it); a NetworkPolicy, or 'none' / 'public-only' / "
        "'allow-all', gives it one whose every flow the host decides (docs/network.md)",
    )
    hosts: dict[str, str] = Field(
        default_factory=dict,
        description="host-side name pinning: {'api.test': '127.0.0.1'} makes the guest's "
        "DNS answer api.test with an address the host maps to 127.0.0.1",
    )
    ports: dict[int | str, int] = Field(
        default_factory=dict,
        description="publish guest ports on the host's 127.0.0.1: {8080: 18080} makes "
        "host 127.0.0.1:18080 reach guest TCP port 8080 (host port 0: any free port); "
        "a key '5353/udp' publishes a UDP port ('8080/tcp' is the same as 8080)",
    )
    secrets: tuple[Secret, ...] = Field(
        default=(),
        exclude=True,  # never serialized: a stored config or snapshot holds no secret
        description="Secret.env(...) values the guest sees only as placeholders; the host "
        "substitutes them in traffic to each secret's allowed hosts (needs network=)",
    )
    upstream_ca_certs: tuple[Path, ...] = Field(
        default=(),
        description="CA files the host trusts, besides the system's, for the TLS it "
        "opens to a secret's hosts after intercepting the guest's (a test server's CA)",
    )
    cold_boot: bool = Field(
        False, description="boot from scratch instead of restoring a clone of a template"
    )
    cache_dir: Path | None = Field(
        None,
        description="cache for images and templates (None: $MICROSANDBOX_CACHE_DIR, "
        "else the user cache directory)",
    )

    def __init__(self, **data: Any) -> None:
        image = data.get("image")
        if isinstance(image, Image):
            data = {**data, **image.config_fields()}
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("SandboxConfig", exc)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> SandboxConfig:
        """Parse a JSON document produced by :meth:`to_json`.

        An image directory is not required to exist any more (a snapshot made
        from it restores without it); volumes still are.

        :raises ConfigError: the JSON is malformed or a field is invalid.
        """
        token = _PARSING_STORED.set(True)
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            # Validation runs our __init__, whose ConfigError pydantic wraps as a
            # "Value error" of the root: raise that error itself, not a wrapper.
            raise _inner_config_error(exc) or ConfigError(
                _format_validation_error("SandboxConfig", exc)
            ) from None
        finally:
            _PARSING_STORED.reset(token)

    def to_json(self) -> str:
        return self.model_dump_json()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be 1-63 characters of letters, digits, '_', '.', '-', starting "
                "with a letter or digit"
            )
        return value

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if not value:
            raise ValueError('must be "host" or a directory path')
        if value == "host" or _PARSING_STORED.get():
            return value
        if "\0" in value:
            raise ValueError("contains a NUL byte")
        # The rule of images.resolve_root_layers: a value that looks like a path
        # (or names something that exists) is a directory image; anything else is
        # left to the image resolver (registry references, later).
        candidate = Path(value).expanduser()
        if not (value.startswith(("/", ".", "~")) or candidate.exists()):
            try:
                parse_reference(value)
            except ImageError as exc:
                raise ValueError(
                    f'{exc.message}; an image is "host", a directory path, or an OCI '
                    "image reference"
                ) from None
            return value
        if not candidate.exists():
            raise ValueError(
                f"image directory {value!r} does not exist: create it, fix the path, or "
                'use image="host" (the host\'s own userspace)'
            )
        if not candidate.is_dir() and not candidate.is_file():
            raise ValueError(
                f"image {value!r} is neither a directory nor a disk image file: pass a "
                "directory whose contents become the guest's root, or a disk image"
            )
        if candidate.resolve() == Path("/"):
            raise ValueError('is the host\'s root "/": use image="host" instead')
        return value

    @field_validator("scripts")
    @classmethod
    def _check_scripts(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _SCRIPT_NAME_RE.match(name):
                raise ValueError(
                    f"script name {name!r} is not a plain file name (letters, digits, . _ -)"
                )
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        total = 0
        for key, val in value.items():
            if not _ENV_KEY_RE.match(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\0" in val:
                raise ValueError(f"environment variable {key} contains a NUL byte")
            size = len(f"{key}={val}".encode("utf-8", "surrogateescape"))
            if size + 1 > MAX_ARG_STRLEN:  # execve counts the terminating NUL
                raise ValueError(
                    f"environment variable {key} is {size} bytes as KEY=VALUE, over "
                    f"Linux's limit of {MAX_ARG_STRLEN - 1} bytes for one environment "
                    "string (MAX_ARG_STRLEN): pass large data in a file"
                )
            total += 5 + size  # as an ENV field of the EXEC frame
        if MIN_FRAME + total > MAX_FRAME:
            raise ValueError(
                f"the environment takes {total} bytes, over the {MAX_FRAME}-byte limit of "
                "one exec request (arguments included): pass large data in a file"
            )
        return value

    @field_validator("volumes")
    @classmethod
    def _check_volumes(cls, value: dict[str, Volume]) -> dict[str, Volume]:
        binds = _count_binds(value)
        if binds > MAX_VOLUMES:
            raise ValueError(
                f"{binds} bind volumes given, at most {MAX_VOLUMES} are supported "
                "(one spare 9p device each): bind a common parent directory instead"
            )
        images = sum(1 for v in value.values() if v.kind == "image")
        if images > MAX_IMAGE_VOLUMES:
            raise ValueError(
                f"{images} image volumes given, at most {MAX_IMAGE_VOLUMES} is "
                "supported (the one spare disk): put their trees in one image"
            )
        out: dict[str, Volume] = {}
        for raw, volume in value.items():
            path = _normalize_guest_path(raw)
            if path in out:
                raise ValueError(f"guest path {raw!r} is given twice (as {path}): merge them")
            out[path] = volume
        for outer in out:
            for inner in out:
                if not inner.startswith(outer + "/"):
                    continue
                raise ValueError(
                    f"volume {inner} is nested inside volume {outer}: nested volumes "
                    "are not supported; use sibling guest paths"
                )
        return out

    @field_validator("network", mode="before")
    @classmethod
    def _check_network(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return NetworkPolicy.from_name(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: dict[str, str]) -> dict[str, str]:
        import ipaddress

        out: dict[str, str] = {}
        for name, addr in value.items():
            key = normalize_name(name)
            if not key or len(key) > 253 or not all(c.isalnum() or c in "-._" for c in key):
                raise ValueError(f"host name {name!r} is not a DNS name such as api.test")
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(
                    f"hosts[{name!r}]={addr!r} is not an IP address: pin names to addresses"
                ) from None
            out[key] = str(ip)
        if len(out) > 60000:
            raise ValueError("more than 60000 pinned names")
        return out

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, value: dict[int | str, int]) -> dict[int | str, int]:
        # Keys normalized: an int for TCP (8080, "8080", "8080/tcp"), "N/udp" for UDP.
        out: dict[int | str, int] = {}
        hosts: set[tuple[str, int]] = set()
        for key, host_port in value.items():
            guest_port, protocol = parse_port_key(key)
            if not 0 <= host_port <= 65535:
                raise ValueError(f"ports[{key!r}]: host port {host_port} is outside 0..65535")
            if host_port and (protocol, host_port) in hosts:
                raise ValueError(f"host port {host_port}/{protocol} is given for two guest ports")
            hosts.add((protocol, host_port))
            norm: int | str = guest_port if protocol == "tcp" else f"{guest_port}/udp"
            if norm in out:
                raise ValueError(f"ports[{key!r}]: guest port {norm} is given twice")
            out[norm] = host_port
        return out

    @field_validator("workdir", "shell")
    @classmethod
    def _check_abs(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute guest path")
        return value

    @model_validator(mode="after")
    def _check_secrets(self) -> SandboxConfig:
        names = [s.env_var for s in self.secrets]
        if self.secrets and self.network is None:
            raise ValueError(
                "secrets need a network: set network= (a secret only ever leaves the host "
                "in traffic the host relays)"
            )
        for name in names:
            if names.count(name) > 1 or name in self.env:
                raise ValueError(f"secrets: {name} is given twice (secrets or env): keep one")
        return self

    @model_validator(mode="after")
    def _check_volume_slots(self) -> SandboxConfig:
        binds = _count_binds(self.volumes)
        if self.volume_slots is not None and binds > self.volume_slots:
            raise ValueError(
                f"volume_slots={self.volume_slots} leaves no room for {binds} bind "
                f"volumes: raise volume_slots to {binds} or leave it None"
            )
        return self

    def volume_slot_count(self) -> int:
        """The number of spare 9p devices this sandbox's template carries."""
        if self.volume_slots is not None:
            return self.volume_slots
        return MAX_VOLUMES if _count_binds(self.volumes) else 0

    def check_host_capacity(self) -> None:
        """Check that this host can give the sandbox its ``memory`` (done when a
        sandbox starts, not at construction: a config stays valid on other
        hosts). ``cpus`` may exceed the host's CPU count: the virtual CPUs then
        share its cores, which is what a 2-vCPU test on a 1-core runner wants.

        :raises ConfigError: ``memory`` is above the host's RAM plus swap.
        """
        meminfo = _host_meminfo()
        if meminfo is not None:
            total_mib = (meminfo.get("MemTotal", 0) + meminfo.get("SwapTotal", 0)) // 1024
            available_mib = meminfo.get("MemAvailable", 0) // 1024
            if total_mib and self.memory > total_mib:
                raise ConfigError(
                    f"memory={self.memory} MiB is more than this host has: "
                    f"{total_mib} MiB of RAM and swap, {available_mib} MiB of it available "
                    f"now; lower memory (guests start with 512 MiB by default)"
                )

    def resolved_accel(self) -> AccelChoice:
        """The accelerator choice after applying ``$MICROSANDBOX_ACCEL``.

        :raises ConfigError: the environment variable holds an unknown value.
        """
        return self.accel if self.accel is not None else env_accel_choice()

    def resolved_project_root(self) -> Path | None:
        if self.project_root is not None:
            return self.project_root.resolve()
        return find_project_root()


def _host_meminfo() -> dict[str, int] | None:
    """The host's /proc/meminfo in KiB, or None where there is none."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    info: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0])
    return info
