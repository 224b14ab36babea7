"""Who an end client is, for the trusted module's lockout: never a value the client itself can choose.

The python engine sees the TCP peer: that address is the client, unless the peer is a configured trusted proxy
(`--trusted-proxy CIDR`), whose X-Forwarded-For chain is then read from the right, skipping the trusted proxies'
own addresses: the first address not in them is the client (the entries further left were written by the client
and are ignored). Triton does not pass the peer address to its backends, so behind Triton the chain is read only
when trusted proxies are configured, which states that Triton is reachable through them alone; without them the
forwarded header is ignored and every request counts as the runtime's own. Either way the module checks a
license's signature before any lockout, so a shared or mistaken identity costs no valid license anything
(sealnet/enclave_sim/policy.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_identity(ip: IPAddress) -> str:
    """`ipv4:A.B.C.D`; for IPv6 its /64 network, the block one subscriber usually holds (each address in it
    would otherwise be a fresh client with its own allowance of failures)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ipv4:{ip.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ipv4:{ip}"


def parse_address(text: str) -> IPAddress | None:
    """An address from a peer string or a forwarded entry (`1.2.3.4`, `[::1]:5`, `ipv6:[::1]:5`), else None."""
    text = text.strip().removeprefix("ipv4:").removeprefix("ipv6:")
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


class TrustedProxies:
    """The `--trusted-proxy` networks and the rule that reads a client out of a forwarded chain."""

    def __init__(self, cidrs: Iterable[str] = ()):
        try:
            self.networks = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())
        except ValueError as exc:
            raise ValueError(f"--trusted-proxy: {exc}") from None

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return ",".join(map(str, self.networks))

    def trusts(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def client(self, peer: IPAddress | None, forwarded: str) -> str:
        """The end client: `peer` itself unless it is a trusted proxy (peer None: behind Triton, where the
        peer is a trusted proxy by deployment when any is configured); then the right-most forwarded address
        that is not a trusted proxy. '' when nothing trustworthy names one."""
        if peer is not None and not self.trusts(peer):
            return address_identity(peer)
        if not self.networks:
            return ""
        for entry in reversed(forwarded.split(",")[-16:]):
            ip = parse_address(entry)
            if ip is None:
                return ""  # a malformed entry where a proxy should have written an address: trust nothing
            if not self.trusts(ip):
                return address_identity(ip)
        return address_identity(peer) if peer is not None else ""
