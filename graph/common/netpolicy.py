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
from typing import Any
from urllib.parse import urlsplit

# Link-local (AWS, GCP, Azure metadata at 169.254.169.254), AWS's IPv6 metadata endpoint
# and Alibaba Cloud's.
DEFAULT_DENIED: tuple[str, ...] = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
)
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
        if any(form in n for form in _forms(address) for n in deny if form.version == n.version):
            return REFUSED
    return None


def _forms(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Any]:
    """The address and the IPv4 addresses an IPv6 one carries (mapped, NAT64, 6to4,
    Teredo); 0.0.0.0 and :: connect to this host, so they count as loopback too."""
    forms: list[Any] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        forms += [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
        if address.teredo is not None:
            forms += list(address.teredo)
        if address in NAT64:
            forms.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.is_unspecified or (address.version == 4 and address in ZERO):
        forms += [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    return forms


NAT64 = ipaddress.ip_network("64:ff9b::/96")
ZERO = ipaddress.ip_network("0.0.0.0/8")
