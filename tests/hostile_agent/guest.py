"""Hostile agent: run as root inside a sandbox, it takes over the real agent's port
and answers the host from a rule file (tests/hostile_agent/__init__.py writes both).

What guest root can do, so what the host must survive: freeze the agent (PID 1)
with ptrace, copy its port fd with pidfd_getfd, then speak the wire protocol
(docs/protocol.md) itself. Self-contained (stdlib + ctypes): it must not depend on
the project being importable in the guest.

Usage: python3 guest.py RULES.json
RULES.json: {"rules": [{"type": int, "path": hex|null, "actions": [...]}, ...]}
an action is {"frame": hex, "repeat": n} (a frame whose id bytes are replaced by
the request's id), {"raw": hex} (bytes sent as they are) or {"sleep": seconds}.
The first rule whose type (and PATH, if given) matches a request is used; with
none, PING gets OK, requests that take no reply get nothing, anything else gets
ERROR EIO. The handshake: after the takeover it sends LOG "hostile-agent: ready"
(id 0), which the host sees in AgentClient.logs; failures before that go to
RULES.json + ".err" (the real agent still serves then, so the host can read it).
"""

import ctypes
import json
import os
import select
import struct
import sys
import time
import traceback

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
WALL = 0x40000000

LOG, OK, ERROR = 0x02, 0xF0, 0xF1
NO_REPLY = {0x11, 0x12, 0x22, 0x23}  # STDIN, SIGNAL, FS_CHUNK, FS_END
PING = 0x04
T_PATH, T_ERRNO, T_MESSAGE = 11, 19, 20
EIO = 5

READY_MESSAGE = b"hostile-agent: ready"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def field(tag, value):
    return struct.pack(">BI", tag, len(value)) + value


def frame(id_, type_, body=b""):
    return struct.pack(">IIB", 5 + len(body), id_, type_) + body


def agent_port():
    """The agent's port device and the fd number PID 1 holds it under."""
    base = "/sys/class/virtio-ports"
    for port in os.listdir(base):
        with open(f"{base}/{port}/name") as f:
            if f.read().strip() == "msb.agent":
                device = f"/dev/{port}"
                break
    else:
        raise RuntimeError("no virtio port named msb.agent")
    for fd in os.listdir("/proc/1/fd"):
        try:
            if os.readlink(f"/proc/1/fd/{fd}") == device:
                return device, int(fd)
        except OSError:
            continue
    raise RuntimeError(f"PID 1 holds no fd on {device}")


def take_over():
    device, target_fd = agent_port()
    check(libc.ptrace(PTRACE_SEIZE, 1, None, None), "PTRACE_SEIZE 1")
    check(libc.ptrace(PTRACE_INTERRUPT, 1, None, None), "PTRACE_INTERRUPT 1")
    os.waitpid(1, WALL)  # PID 1 is now stopped: it reads and writes nothing
    pidfd = check(libc.syscall(SYS_PIDFD_OPEN, 1, 0), "pidfd_open 1")
    port = check(libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0), f"pidfd_getfd {device}")
    os.set_blocking(port, True)  # shared with the frozen agent, which set O_NONBLOCK
    return port


def send(port, data):
    view = memoryview(data)
    while view:
        view = view[os.write(port, view) :]


def fields_of(body):
    out = {}
    pos = 0
    while pos + 5 <= len(body):
        tag, n = struct.unpack_from(">BI", body, pos)
        out.setdefault(tag, body[pos + 5 : pos + 5 + n])
        pos += 5 + n
    return out


def frames(port, stop_at_eof=False):
    buf = b""
    while True:
        select.select([port], [], [])
        chunk = os.read(port, 1 << 20)
        if not chunk:
            if stop_at_eof:  # a socket in the harness's own tests
                return
            time.sleep(0.01)  # the port: no host connected at this instant; keep waiting
            continue
        buf += chunk
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">I", buf)
            if len(buf) < 4 + length:
                break
            id_, type_ = struct.unpack_from(">IB", buf, 4)
            yield id_, type_, fields_of(buf[9 : 4 + length])
            buf = buf[4 + length :]


def serve(port, rules, stop_at_eof=False):
    for id_, type_, fields in frames(port, stop_at_eof):
        rule = next(
            (
                r
                for r in rules
                if r["type"] == type_
                and (r.get("path") is None or bytes.fromhex(r["path"]) == fields.get(T_PATH))
            ),
            None,
        )
        if rule is None:
            if type_ == PING:
                send(port, frame(id_, OK))
            elif type_ not in NO_REPLY:
                message = f"hostile agent: no rule for type {type_:#04x}".encode()
                body = field(T_ERRNO, struct.pack(">q", EIO)) + field(T_MESSAGE, message)
                send(port, frame(id_, ERROR, body))
            continue
        for action in rule["actions"]:
            if "sleep" in action:
                time.sleep(action["sleep"])
            elif "raw" in action:
                send(port, bytes.fromhex(action["raw"]))
            else:
                data = bytearray(bytes.fromhex(action["frame"]))
                data[4:8] = struct.pack(">I", id_)
                for _ in range(action.get("repeat", 1)):
                    send(port, data)


def main():
    rules_path = sys.argv[1]
    try:
        with open(rules_path) as f:
            rules = json.load(f)["rules"]
        port = take_over()
    except BaseException:
        with open(rules_path + ".err", "w") as f:
            traceback.print_exc(file=f)
        raise
    send(port, frame(0, LOG, field(T_MESSAGE, READY_MESSAGE)))
    serve(port, rules)


if __name__ == "__main__":
    main()
