"""The exception hierarchy of pytest-microsandbox.

Every error the runtime raises on purpose derives from :class:`SandboxError`::

    SandboxError
    ├── ConfigError                  a configuration value is invalid
    ├── BackendUnavailableError      no VM engine can run on this host
    │   └── KernelNotFoundError      the guest kernel has not been provisioned
    ├── ImageError                   a root filesystem image cannot be built
    │   ├── ImageNotFoundError       the registry or local store has no such image
    │   ├── RegistryAuthError        the registry refused the credentials
    │   ├── RegistryUnreachableError the registry did not answer (connection, timeout)
    │   ├── ImagePlatformError       the image has no linux/amd64 variant
    │   └── ImageInUseError          a stored image is removed while a live sandbox uses it
    ├── AgentBuildError              the guest agent cannot be compiled
    ├── BootError                    a VM did not reach its agent
    │   └── GuestCrashedError        the guest died (panic, power-off, QEMU exit)
    ├── ProtocolError                the guest sent bytes that break the protocol
    ├── SandboxNotRunningError       an operation needs a running sandbox
    │   ├── SandboxPausedError       the sandbox is paused (resume() it first)
    │   └── SandboxDrainingError     the sandbox is draining and takes no new work
    ├── SandboxExistsError           a live sandbox already has that name
    ├── SandboxNotFoundError         no sandbox has that name
    ├── ExecError                    a command could not be started in the guest
    │   └── CommandNotFoundError     the program does not exist in the guest
    ├── ExecTimeoutError             a command ran past its timeout and was killed
    ├── OutputLimitError             a command's output or a file read passed its size limit
    ├── GuestTimeoutError            the guest stopped answering
    ├── LockTimeoutError             a cache lock (probe, build) was held by another too long
    ├── SnapshotError                a template or snapshot cannot be built, used or restored
    │   ├── SnapshotNotFoundError    no snapshot has that name or path
    │   └── SnapshotLockTimeoutError a template's or zygote's build lock was held too long
    │                                (also a LockTimeoutError)
    └── FilesystemError              a guest file operation failed
        ├── PathNotFoundError        the guest path does not exist
        ├── UnsafeHostPathError      a host write of guest data would leave its destination
        └── CopyLimitError           a copy to the host passed its byte or entry budget

Errors that concern a running guest carry ``console_tail``: the last lines the
guest printed on its console, which usually say why it failed.
"""

from __future__ import annotations

__all__ = [
    "AgentBuildError",
    "BackendUnavailableError",
    "BootError",
    "CommandNotFoundError",
    "ConfigError",
    "CopyLimitError",
    "ExecError",
    "ExecTimeoutError",
    "FilesystemError",
    "GuestCrashedError",
    "GuestTimeoutError",
    "ImageError",
    "ImageInUseError",
    "ImageNotFoundError",
    "ImagePlatformError",
    "KernelNotFoundError",
    "LockTimeoutError",
    "OutputLimitError",
    "PathNotFoundError",
    "ProtocolError",
    "RegistryAuthError",
    "RegistryUnreachableError",
    "SandboxDrainingError",
    "SandboxError",
    "SandboxExistsError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxPausedError",
    "SnapshotError",
    "SnapshotLockTimeoutError",
    "SnapshotNotFoundError",
    "UnsafeHostPathError",
]


class SandboxError(Exception):
    """Base of every error raised by pytest-microsandbox on purpose."""

    def __init__(self, message: str, *, console_tail: str | None = None) -> None:
        self.message = message
        self.console_tail = console_tail
        super().__init__(message)

    def __str__(self) -> str:
        if self.console_tail:
            return f"{self.message}\n--- guest console (last lines) ---\n{self.console_tail}"
        return self.message


class ConfigError(SandboxError, ValueError):
    """Raised when a configuration value is invalid; the message names the field."""


class BackendUnavailableError(SandboxError):
    """Raised when no VM engine can run here (QEMU missing, no accelerator that boots)."""


class KernelNotFoundError(BackendUnavailableError):
    """Raised when the guest kernel or its modules are not in the cache directory."""


class ImageError(SandboxError):
    """Raised when a root filesystem image cannot be built or found."""


class ImageNotFoundError(ImageError):
    """Raised when a registry has no such repository, tag or digest, or when
    ``pull_policy="never"`` finds no local copy of the image.
    """


class RegistryAuthError(ImageError):
    """Raised when a registry refuses the credentials given (or asks for some
    and none were given).
    """


class RegistryUnreachableError(ImageError):
    """Raised when a registry cannot be reached: refused connection, timeout,
    or an answer that is not a registry's.
    """


class ImagePlatformError(ImageError):
    """Raised when an image (or every entry of its index) is not linux/amd64."""


class ImageInUseError(ImageError):
    """Raised when a stored OCI image is removed while a live named sandbox was
    created from it (stop the sandbox, or force the removal).
    """


class AgentBuildError(SandboxError):
    """Raised when the static guest agent cannot be compiled."""


class BootError(SandboxError):
    """Raised when a VM does not reach a serving agent within its boot timeout."""


class GuestCrashedError(BootError):
    """Raised when the guest dies: kernel panic, power-off, or the QEMU process exited."""


class ProtocolError(SandboxError):
    """Raised when bytes from the guest break the wire protocol (docs/protocol.md)."""


class SandboxNotRunningError(SandboxError):
    """Raised when an operation needs a running sandbox and this one is stopped."""


class SandboxPausedError(SandboxNotRunningError):
    """Raised when a command or file operation starts on a paused sandbox
    (its guest CPUs are stopped): call ``resume()`` first.
    """


class SandboxDrainingError(SandboxNotRunningError):
    """Raised when a command or file operation starts on a sandbox that is
    draining (``drain()``: the running commands finish, then it stops).
    """


class SandboxExistsError(SandboxError):
    """Raised by ``Sandbox.create`` when a live sandbox already has the name
    (pass ``replace=True`` to stop it first, or choose another name).
    """


class SandboxNotFoundError(SandboxError):
    """Raised by ``Sandbox.get`` / ``Sandbox.remove`` when no live sandbox has
    the name (``Sandbox.list()`` shows the live ones).
    """


class ExecError(SandboxError):
    """Raised when the guest could not start a command."""


class CommandNotFoundError(ExecError):
    """Raised when the program of an exec does not exist in the guest."""


class ExecTimeoutError(SandboxError):
    """Raised when a command ran past its timeout; it has been killed in the guest."""

    def __init__(
        self, message: str, *, stdout: bytes = b"", stderr: bytes = b"", timeout: float = 0.0
    ) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
        self.timeout = timeout


class OutputLimitError(SandboxError):
    """Raised when the host would collect more guest data in memory than allowed:
    a command's stdout and stderr together passed ``max_output`` (the command
    was killed; ``stdout``/``stderr`` hold what came before the limit), or a
    ``fs().read`` passed ``max_size`` (the guest was told to stop reading).
    ``limit`` is the limit in bytes.
    """

    def __init__(
        self, message: str, *, limit: int, stdout: bytes = b"", stderr: bytes = b""
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.stdout = stdout
        self.stderr = stderr


class GuestTimeoutError(SandboxError):
    """Raised when the guest agent stops answering within the configured timeout."""


class FilesystemError(SandboxError, OSError):
    """Raised when a guest file operation fails; ``errno`` is the guest's errno."""

    def __init__(self, message: str, *, errno: int = 0, path: str | None = None) -> None:
        SandboxError.__init__(self, message)
        self.errno = errno
        self.path = path
        self.strerror = message
        self.filename = path

    def __str__(self) -> str:
        return self.message


class PathNotFoundError(FilesystemError, FileNotFoundError):
    """Raised when a guest path does not exist (ENOENT)."""


class LockTimeoutError(SandboxError):
    """Raised when a lock on a cache entry (the KVM probe verdict, the guest agent,
    the initramfs, a root image, the kernel, a template or zygote) was held by
    another process, or another task of this one, for longer than the timeout.

    The message names the lock file, what it guards, and the environment
    variable that sets the timeout; the same are in ``lock_path``, ``what``,
    ``timeout`` and ``timeout_env``.
    """

    def __init__(
        self,
        message: str,
        *,
        lock_path: str = "",
        what: str = "",
        timeout: float = 0.0,
        timeout_env: str = "",
    ) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.what = what
        self.timeout = timeout
        self.timeout_env = timeout_env


class UnsafeHostPathError(FilesystemError):
    """Raised when writing guest data on the host would leave the destination:
    a name that is empty, ``.``, ``..`` or holds ``/`` or NUL, or a symlink (or
    other non-directory) in the way inside the destination (docs/host-writes.md).
    ``path`` is the offending host path.
    """


class CopyLimitError(FilesystemError):
    """Raised when a copy to the host passes its byte or entry budget
    (``max_bytes`` / ``max_entries`` of ``copy_to_host``); the file being
    written is removed, entries finished before stay.
    """


class SnapshotError(SandboxError):
    """Raised when a template or snapshot cannot be built (e.g. the disk is full),
    is unusable (corrupt, from another QEMU), or a restore, snapshot or fork fails.
    """


class SnapshotNotFoundError(SnapshotError):
    """Raised when no snapshot exists under the given name or path."""


class SnapshotLockTimeoutError(SnapshotError, LockTimeoutError):
    """Raised when another process (or task) held the build lock of a template or
    zygote past the timeout; a :class:`LockTimeoutError` too.
    """
