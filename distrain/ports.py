"""TCP ports on this machine: is one free, and if not, which process holds it (for errors a user can act on)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Optional, Tuple


def port_in_use(port: int, host: str = "") -> bool:
    """Whether binding ``host:port`` fails because something already listens there ("" = all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free right now (another process may still take it before you do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_owner(port: int) -> Optional[Tuple[int, str]]:
    """(pid, command line) of the process listening on ``port``, from /proc (Linux); None when unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    if not inodes:
        return None
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return int(pid_dir.name), cmdline.strip()
        except OSError:  # a process that exited meanwhile, or one we may not inspect
            continue
    return None


def describe_owner(port: int) -> str:
    """"process 1234 (python busy.py)" or "another process" - for messages."""
    owner = port_owner(port)
    if owner is None:
        return "another process"
    pid, cmdline = owner
    short = cmdline if len(cmdline) <= 80 else cmdline[:77] + "..."
    return f"process {pid} ({short})"


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, its hostname, or one of its addresses)."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    if address.startswith("127."):
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        local = set()
    return address in local
