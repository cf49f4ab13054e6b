"""Loaded by any Python started with tests/netguard on PYTHONPATH: refuses (and records) every connection, datagram
and name lookup that leaves the machine, so tests/test_offline_network.py can prove a server fetches nothing.

The record goes to the file named by NETGUARD_LOG, one line per attempt. uvloop is hidden, so the server runs on
asyncio's own loop, whose connections all go through `socket.socket.connect` (uvloop's are made in C, unseen here).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

_LOG = os.environ.get("NETGUARD_LOG", "")
sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` raises ImportError: asyncio's loop


def _local(host: Any) -> bool:
    if not isinstance(host, str) or host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host.endswith(".localhost")


def _refuse(what: str) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {what}\n")
    raise PermissionError(f"netguard: outbound network refused ({what})")


def _checked(address: Any, family: int) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _local(address[0]):
        _refuse(f"connect {address[0]}:{address[1]}")


_connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
_getaddrinfo = socket.getaddrinfo


def connect(self: socket.socket, address: Any) -> None:
    _checked(address, self.family)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: Any) -> int:
    _checked(address, self.family)
    return _connect_ex(self, address)


def sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _checked(args[-1], self.family)
    return _sendto(self, data, *args)  # type: ignore[call-arg]


def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not _local(host):
        _refuse(f"resolve {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
socket.socket.sendto = sendto  # type: ignore[method-assign]
socket.getaddrinfo = getaddrinfo
