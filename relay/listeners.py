"""Listeners: the ``listen:`` entries, their TLS contexts, binding and rebinding.

A reload must be all or nothing, so changing the listeners happens in two
steps. :meth:`Listeners.prepare` does everything that can fail while the old
set keeps serving: it reads every TLS certificate and key once, into new
contexts, and binds the addresses that are new. :meth:`Listeners.commit` then
cannot fail but for one case: an entry whose socket options changed at an
address it keeps must be unbound before it is bound again; if that bind
fails, the old entry is bound again and the reload fails as a whole.

A TLS listener's certificate is renewed without rebinding: the context the
server was created with chooses, per handshake, the context most recently
loaded for it (``sni_callback``, called for every ClientHello with or without
SNI), so live TLS sessions keep theirs and new ones get the new files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.config import ListenModel, TLSModel
from relay.hostport import hostport

LISTEN_BACKLOG = 1024


def tls_server_context(tls: TLSModel) -> ssl.SSLContext:
    """The listener's TLS: our certificate, and with client_ca a required client one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def cert_name(peercert: Any) -> str | None:
    """The client certificate's subject commonName (else its first DNS SAN)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None


class Listener:
    """One ``listen:`` entry: its socket options, TLS and PROXY-protocol settings."""

    __slots__ = (
        "_current",
        "name",
        "port",
        "proxy_protocol",
        "sni",
        "spec",
        "ssl",
        "target_port",
        "trusted",
    )

    def __init__(self, spec: ListenModel, ctx: ssl.SSLContext | None = None) -> None:
        self.spec = spec
        self.name = spec.name or spec.address
        self.sni = spec.mode == "sni"
        self.port = 0  # the bound port, set once listening
        self.target_port = spec.target_port  # SNI: the port to dial, if not the bound one
        self.proxy_protocol = spec.proxy_protocol
        self.trusted = tuple(ipaddress.ip_network(c) for c in spec.trusted_proxies)
        if ctx is None and spec.tls is not None:
            ctx = tls_server_context(spec.tls)
        self.ssl = ctx  # the context the server was created with
        self._current = ctx
        if ctx is not None:
            ctx.sni_callback = self._choose

    def _choose(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current
        if current is not None and current is not ctx:
            sslobj.context = current

    def renew(self, ctx: ssl.SSLContext) -> None:
        """New handshakes use ``ctx``'s certificate and key (cannot fail)."""
        self._current = ctx

    def trusts(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)


def _socket_key(spec: ListenModel) -> str:
    """What the server socket itself depends on: the address and the TLS setup
    (a TLS listener's server is created with its context). Everything else in
    a spec is read per connection and changes without rebinding."""
    tls = spec.tls
    shape = None if tls is None else (tls.min_version, tls.client_ca)
    return f"{spec.address}|{shape}"


@dataclass(eq=False)
class Slot:
    """One ``listen:`` address's servers (one per socket: a name may resolve
    to several addresses) and the listener its connections get (swappable)."""

    listener: Listener
    address: tuple[str, int]
    servers: list[asyncio.Server] = field(default_factory=list)
    names: list[tuple[str, int]] = field(default_factory=list)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    @property
    def sockets(self) -> list[Any]:
        return [sock for server in self.servers for sock in server.sockets]


@dataclass(eq=False)
class Handed:
    """A listener's sockets given to a successor: duplicates kept so that a
    failed upgrade can take them back (upgrade.py)."""

    slot: Slot
    socks: list[socket.socket]


@dataclass
class Plan:
    """A prepared change: new contexts read, fresh addresses bound."""

    wanted: list[tuple[ListenModel, tuple[str, int]]]
    contexts: dict[int, ssl.SSLContext]
    fresh: dict[int, Slot]


class Listeners:
    """The bound listeners. ``make_protocol(slot)`` builds a connection's
    protocol from the slot's current listener; ``on_bound(name, added)``
    reports every socket address that starts or stops listening."""

    def __init__(
        self,
        make_protocol: Callable[[Slot], asyncio.Protocol],
        on_bound: Callable[[tuple[str, int], bool], None],
        *,
        reuse_port: bool,
        handshake_timeout: Callable[[], float],
    ) -> None:
        self.make_protocol = make_protocol
        self.on_bound = on_bound
        self.reuse_port = reuse_port
        self.handshake_timeout = handshake_timeout
        self.slots: list[Slot] = []

    @property
    def addresses(self) -> list[str]:
        return [hostport(*name) for slot in self.slots for name in slot.names]

    async def bind(
        self,
        spec: ListenModel,
        address: tuple[str, int],
        ctx: ssl.SSLContext | None = None,
        socks: list[socket.socket] | None = None,
    ) -> Slot:
        """Listen on ``address``; with ``socks``, on those listening sockets
        (a predecessor's, upgrade.py) instead of binding new ones."""
        listener = Listener(spec, ctx)
        slot = Slot(listener, address)
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {
            "backlog": LISTEN_BACKLOG,
            "ssl": listener.ssl,
            "ssl_handshake_timeout": self.handshake_timeout() if listener.ssl else None,
        }
        if socks is None:
            slot.servers.append(
                await loop.create_server(
                    lambda: self.make_protocol(slot),
                    address[0],
                    address[1],
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                    **options,
                )
            )
        else:
            for sock in socks:
                slot.servers.append(
                    await loop.create_server(lambda: self.make_protocol(slot), sock=sock, **options)
                )
        for sock in slot.sockets:
            # Accepted sockets inherit these on Linux: no per-connection syscalls.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            name = sock.getsockname()
            slot.names.append((name[0], name[1]))
            self.on_bound((name[0], name[1]), True)
            listener.port = name[1]
        return slot

    def _close(self, slot: Slot) -> None:
        slot.close()
        for name in slot.names:
            self.on_bound(name, False)

    def close(self) -> None:
        """Stop accepting on every listener (drain and stop)."""
        for slot in self.slots:
            slot.close()

    # --- an upgrade ---------------------------------------------------------------

    def hand_over(self) -> list[Handed]:
        """Stop accepting, keeping a duplicate of every listening socket (for
        the successor; ours to take back). New connections wait in the
        sockets' queues meanwhile: none is refused."""
        handed = []
        for slot in self.slots:
            socks = [socket.socket(fileno=os.dup(sock.fileno())) for sock in slot.sockets]
            slot.close()
            handed.append(Handed(slot, socks))
        return handed

    async def take_back(self, handed: list[Handed]) -> None:
        """Accept again on the sockets hand_over() kept (a failed upgrade)."""
        for h in handed:
            slot = h.slot
            loop = asyncio.get_running_loop()
            slot.servers = [
                await loop.create_server(
                    lambda s=slot: self.make_protocol(s),
                    sock=sock,
                    backlog=LISTEN_BACKLOG,
                    ssl=slot.listener.ssl,
                    ssl_handshake_timeout=(self.handshake_timeout() if slot.listener.ssl else None),
                )
                for sock in h.socks
            ]

    async def prepare(
        self,
        wanted: list[tuple[ListenModel, tuple[str, int]]],
        inherited: dict[tuple[str, int], list[list[socket.socket]]] | None = None,
    ) -> Plan:
        """Read the TLS files and bind new addresses; raise ListenError with
        every problem (then nothing is bound and nothing changed). An address
        in ``inherited`` (a predecessor's listening sockets by configured
        address, upgrade.py) is served on those sockets instead of bound."""
        errors: list[str] = []
        contexts: dict[int, ssl.SSLContext] = {}
        for i, (spec, _) in enumerate(wanted):
            if spec.tls is not None:
                try:
                    contexts[i] = tls_server_context(spec.tls)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    errors.append(f"listen.{i}.tls: {exc}")
        if errors:
            raise ListenError(errors)
        plan = Plan(wanted, contexts, {})
        in_use = {slot.address for slot in self.slots}
        for i, (spec, address) in enumerate(wanted):
            if self._match(spec, address) is None and address not in in_use:
                socks = (inherited or {}).get(address)
                try:
                    plan.fresh[i] = await self.bind(
                        spec, address, contexts.get(i), socks.pop(0) if socks else None
                    )
                except OSError as exc:
                    self.abandon(plan)
                    raise ListenError([f"listen.{i}: {exc}"]) from None
        return plan

    def _match(self, spec: ListenModel, address: tuple[str, int]) -> Slot | None:
        key = _socket_key(spec)
        for slot in self.slots:
            if slot.address == address and _socket_key(slot.listener.spec) == key:
                return slot
        return None

    def abandon(self, plan: Plan) -> None:
        for slot in plan.fresh.values():
            self._close(slot)
        plan.fresh.clear()

    async def commit(self, plan: Plan) -> None:
        """Put the prepared set in place. Entries kept at their address get
        their new listener settings and certificates at once; retired ones
        stop accepting. Raise ListenError (and restore the old set) only when
        an address that had to be unbound and bound again cannot be."""
        keep: dict[int, Slot] = {}
        taken: set[int] = set()
        for i, (spec, address) in enumerate(plan.wanted):
            if i in plan.fresh:
                continue
            slot = self._match(spec, address)
            if slot is not None and id(slot) not in taken:
                keep[i] = slot
                taken.add(id(slot))
        retired = [s for s in self.slots if id(s) not in taken]
        rebind = [i for i in range(len(plan.wanted)) if i not in plan.fresh and i not in keep]
        for slot in retired:
            self._close(slot)
        rebound: dict[int, Slot] = {}
        for i in rebind:
            spec, address = plan.wanted[i]
            try:
                rebound[i] = await self.bind(spec, address, plan.contexts.get(i))
            except OSError as exc:
                for slot in rebound.values():
                    self._close(slot)
                self.abandon(plan)
                await self._restore(retired)
                raise ListenError([f"listen.{i}: {exc}"]) from None
        slots: list[Slot] = []
        for i, (spec, _) in enumerate(plan.wanted):
            if i in keep:
                slot = keep[i]
                old = slot.listener
                listener = Listener(spec, old.ssl)
                listener.port = old.port
                if i in plan.contexts:
                    listener.renew(plan.contexts[i])
                slot.listener = listener
                slots.append(slot)
            else:
                slots.append(plan.fresh.get(i) or rebound[i])
        self.slots = slots

    async def _restore(self, retired: list[Slot]) -> None:
        """Bind the retired entries again after a failed commit."""
        restored = []
        for slot in retired:
            try:
                restored.append(
                    await self.bind(slot.listener.spec, slot.address, slot.listener.ssl)
                )
            except OSError:
                continue  # nothing better to do: the reload reports the failure
        by_address = {s.address: s for s in restored}
        self.slots = [by_address.get(s.address, s) if s in retired else s for s in self.slots]


class ListenError(Exception):
    """Listeners that cannot be put in place; ``errors`` name each with its location."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
