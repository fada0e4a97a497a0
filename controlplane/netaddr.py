"""Small address predicates shared by the bootstrap, the node agent and the runtime (where a
token may go in clear: only to loopback). Pure, no I/O."""

from __future__ import annotations

import ipaddress


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """`host` (a name or an address, brackets allowed) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host part of `HOST:PORT` (IPv6 brackets removed)."""
    return address.rpartition(":")[0].strip("[]")
