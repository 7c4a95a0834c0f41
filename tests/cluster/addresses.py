"""Loopback addresses for fake pods: each pod gets its own, so each stub can listen on its real containerPort."""

from __future__ import annotations

import ipaddress
import socket


class IpPool:
    """Loopback addresses in 127.<block>.0.0/16, handed out in order and not reused until the range wraps, so a
    new pod never inherits an address a client (or a stale EndpointSlice) still associates with a dead one.

    Several clusters may run on one machine (a developer's `up` plus a test session): each agent claims its own
    block by holding a listening socket on CLAIM_PORT of the block's last address, which the kernel releases
    when the agent dies. Block 0 starts at 127.0.0.2: 127.0.0.1 is the control plane's.
    """

    CLAIM_PORT = 50999

    def __init__(self, block: int = 0) -> None:
        self.block = block
        self.first = int(ipaddress.ip_address(f"127.{block}.0.2"))
        self.last = int(ipaddress.ip_address(f"127.{block}.255.253"))
        self.used: set[int] = set()
        self.cursor = self.first

    @classmethod
    def claim(cls, block: int | None = None) -> tuple["IpPool", socket.socket]:
        for k in [block] if block is not None else range(255):
            sock = socket.socket()
            try:
                sock.bind((f"127.{k}.255.254", cls.CLAIM_PORT))
                sock.listen(1)
                return cls(k), sock
            except OSError:
                sock.close()
        raise RuntimeError("no free 127.x.0.0/16 block for pod addresses")

    def _usable(self, n: int) -> bool:
        return self.first <= n <= self.last and (n & 0xFF) not in (0, 255) and n not in self.used

    def reserve(self, ip: str | None) -> bool:
        """Take a re-adopted pod's address back (it may come from another block if the agent's block changed)."""
        try:
            addr = ipaddress.ip_address(ip or "")
        except ValueError:
            return False
        n = int(addr)
        if not addr.is_loopback or str(addr) == "127.0.0.1" or n in self.used:
            return False
        self.used.add(n)
        if self.first <= n <= self.last:
            self.cursor = max(self.cursor, n + 1)
        return True

    def allocate(self) -> str:
        for _ in range(self.last - self.first + 1):
            n, self.cursor = self.cursor, self.cursor + 1 if self.cursor < self.last else self.first
            if self._usable(n):
                self.used.add(n)
                return str(ipaddress.ip_address(n))
        raise RuntimeError("loopback address pool exhausted")

    def release(self, ip: str | None) -> None:
        if ip:
            self.used.discard(int(ipaddress.ip_address(ip)))
