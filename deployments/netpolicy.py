"""Where outbound fetches (snapshot cameras, media URLs) may go (pure: no Ray).

A URL's host is resolved and refused when any of its addresses lies in a denied
network. By default that is the link-local ranges, where cloud metadata services answer
(169.254.169.254); operators add private ranges (`10.0.0.0/8`, ...) where cameras live
elsewhere. The refusal says "refused by policy" and nothing about the address, so error
texts cannot be used to map a network. A name that resolves differently between this
check and the connection (DNS rebinding) is not covered; redirects are checked again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

DEFAULT_DENIED: tuple[str, ...] = ("169.254.0.0/16", "fe80::/10")
REFUSED = "refused by policy: the URL's host is in a denied network"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parsed networks; raises ValueError naming a bad one (settings validation)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def denied(url: str, deny: Sequence[Network]) -> str | None:
    """REFUSED when the URL's host resolves to an address in `deny`, else None. A host
    that does not resolve is left to the fetch itself (it fails as unreachable)."""
    if not deny:
        return None
    host = urlsplit(url).hostname
    if not host:
        return REFUSED
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if any(address in n or (mapped is not None and mapped in n) for n in deny):
            return REFUSED
    return None
