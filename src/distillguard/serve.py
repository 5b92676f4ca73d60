"""Running the gateway: the public API, the admin API and (for the demo) the demo upstream
as uvicorn servers in one event loop.

:class:`Stack` is what ``distillguard serve`` and ``distillguard demo`` run, and what the
tests start on free ports. Components that add stages, checks or admin routes register
through :data:`distillguard.components.DEFAULT_COMPONENTS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.routing import BaseRoute

from distillguard.config import ServerSettings, Settings
from distillguard.demo_upstream import create_demo_upstream
from distillguard.errors import ConfigError
from distillguard.gateway.admin import AccountsChanged, AdminAPI
from distillguard.gateway.app import Gateway
from distillguard.netaddr import authority
from distillguard.pipeline import RequestCheck, ResponseFilter, Stage

log = logging.getLogger("distillguard.serve")


@dataclass
class Extension:
    """What one component adds to a running gateway.

    ``on_accounts_changed`` are awaited after an admin request changed accounts (their
    status or actions), before it answers: each brings what the component holds of them
    in memory up to date on this replica (:meth:`AdminAPI.accounts_changed`)."""

    stages: list[Stage] = field(default_factory=list)
    checks: list[RequestCheck] = field(default_factory=list)
    admin_routes: list[BaseRoute] = field(default_factory=list)
    response_filters: list[ResponseFilter] = field(default_factory=list)
    on_accounts_changed: list[AccountsChanged] = field(default_factory=list)


ExtensionFactory = Callable[[Settings], "Extension | None"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: one the system picks for it), or
    ConfigError naming the address and why it cannot be had (taken, not this machine's).
    Left to uvicorn, a failed bind is logged and then exits the process from inside the
    event loop, with a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"cannot listen for the {what} on {authority(host, port)}: "
                          f"{exc.strerror or exc}") from None


def _http_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (the one ``http="auto"`` picks), with two changes.

    A client that is slow to send a request is disconnected, as nginx does: a request's
    head (request line and headers) must arrive whole within ``read_timeout_s`` of its
    first byte (client_header_timeout), and its body must not pause for
    ``read_timeout_s`` (client_body_timeout). uvicorn waits for ever: a few thousand
    connections that send part of a request and then nothing, or a header line every few
    seconds (slowloris), hold as many sockets and requests open. A request whose body
    has arrived is never timed out here, however long its answer takes; nor is an idle
    connection between requests (``timeout_keep_alive`` closes it).

    At shutdown an idle TLS connection is aborted rather than closed. Closing it sends
    TLS close_notify and waits for the peer's, up to 30 s (asyncio's SSL shutdown
    timeout), and a client that keeps the connection in its pool never answers: with
    HTTPS the gateway took 30 s to stop. A connection with a response under way
    finishes it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _last_read = 0.0
        # When the head of the request now arriving began (None: no head is arriving).
        # uvicorn makes a new cycle when a head is whole, pipelined ones included.
        _head_began: float | None = None
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._await_client()

        def data_received(self, data: bytes) -> None:
            self._await_client()
            cycle = self.cycle
            if self._head_began is None and (cycle is None or cycle.response_complete):
                self._head_began = self._last_read
            super().data_received(data)
            if self.cycle is not cycle:          # a head came whole
                self._head_began = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _await_client(self) -> None:
            self._last_read = self.loop.time()
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(read_timeout_s, self._check_client)

        def _check_client(self) -> None:
            self._read_timer = None
            cycle = self.cycle
            between = cycle is None or cycle.response_complete
            sending = cycle is not None and cycle.more_body and not cycle.response_started
            if self.transport.is_closing() or not (between or sending):
                return                 # the request is whole: its answer may take long
            now = self.loop.time()
            left = self._last_read + read_timeout_s - now
            if self.flow.read_paused:  # the app has not taken the body yet: ours to wait
                left = read_timeout_s
            if between and self._head_began is not None:   # a head, however it trickles
                left = min(left, self._head_began + read_timeout_s - now)
            if left > 0:
                self._read_timer = self.loop.call_later(left, self._check_client)
            elif (between and self._head_began is None and cycle is not None
                  and self.timeout_keep_alive_task is not None):
                return                 # idle between requests: the keep-alive timer's
            else:
                self.transport.close()

        def shutdown(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.transport.get_extra_info("ssl_object") is not None:
                self.transport.abort()
                return
            super().shutdown()

    return HTTPProtocol


# The demo upstream keeps an idle connection much longer than the gateway's pool does by
# default (upstream.keepalive_s): with the two equal, a request sent on a connection just
# as the upstream closed it failed with a 502 now and again (a test sending after a wait
# of up to a minute saw it). 75 s is also nginx's default.
DEMO_UPSTREAM_KEEPALIVE_S = 75
# Stack.servers holds the public and the admin server first, then the demo upstream's
# (if any): the gateway's servers stop before the upstream they may still need.
GATEWAY_SERVERS = 2


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its :class:`Stack`. Each uvicorn server
    catches SIGTERM and SIGINT itself, and the one started last (the demo upstream)
    caught them first: it stopped, then passed the signal on to the gateway's servers,
    so a request the gateway had accepted but not yet forwarded was answered 502."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: Any, host: str, port: int, *,
            lifespan: Literal["auto", "on", "off"],
            tls: ServerSettings | None = None, keepalive_s: int = 30,
            read_timeout_s: float = 30.0, shutdown_timeout_s: int = 30) -> uvicorn.Server:
    """A uvicorn server for ``app``; HTTPS with ``tls``'s certificate and key when it
    names them. At shutdown the requests under way get ``shutdown_timeout_s`` to be
    answered before they are cancelled."""
    ssl_files: dict[str, Any] = {}
    if tls is not None and tls.tls_cert_file:
        ssl_files = {"ssl_certfile": tls.tls_cert_file, "ssl_keyfile": tls.tls_key_file}
    config = uvicorn.Config(app, host=host, port=port, lifespan=lifespan, log_level="warning",
                            access_log=False, proxy_headers=False, server_header=False,
                            date_header=False, loop="none", http=_http_protocol(read_timeout_s),
                            timeout_keep_alive=keepalive_s,
                            timeout_graceful_shutdown=shutdown_timeout_s, **ssl_files)
    return _Server(config)


@contextlib.contextmanager
def _signals_stop(stack: Stack) -> Iterator[None]:
    """While serving in the main thread, SIGTERM and SIGINT stop ``stack`` gracefully (a
    second SIGINT at once); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: object) -> None:
        stack.stop(force=signum == signal.SIGINT and stack.stopping)

    before = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class Stack:
    """Gateway + admin API (+ demo upstream when ``upstream.base_url`` is ``demo``)."""

    def __init__(self, settings: Settings, *, extensions: list[Extension] | None = None
                 ) -> None:
        self.settings = settings
        self.demo_port: int | None = None
        upstream_url = None
        # The demo upstream's socket is bound here and kept until serve(): a port only
        # picked here and bound there could be taken in between (another process's
        # outgoing connection is given it now and again).
        self._demo_socket: socket.socket | None = None
        if settings.upstream.is_demo:
            self._demo_socket = listen("127.0.0.1", 0, "demo upstream")
            self.demo_port = int(self._demo_socket.getsockname()[1])
            upstream_url = f"http://127.0.0.1:{self.demo_port}/v1"
        try:
            if extensions is None:
                from distillguard.components import load_extensions

                extensions = load_extensions(settings)
            self.extensions = extensions
            self.gateway = Gateway.create(
                settings,
                upstream_url=upstream_url,
                stages=[s for e in extensions for s in e.stages],
                checks=[c for e in extensions for c in e.checks],
                response_filters=[f for e in extensions for f in e.response_filters],
            )
        except BaseException:
            if self._demo_socket is not None:
                self._demo_socket.close()
            raise
        self.admin = AdminAPI(self.gateway, on_accounts_changed=[
            hook for e in extensions for hook in e.on_accounts_changed])
        self.servers: list[uvicorn.Server] = []
        self.stopping = False

    @property
    def base_url(self) -> str:
        return self.settings.server.base_url

    @property
    def admin_url(self) -> str:
        return self.settings.server.admin_url

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        server_cfg = self.settings.server
        # Every address is taken before any server starts: one that cannot be had is one
        # clear error, and a port of 0 becomes the one the system gave.
        sockets: list[socket.socket] = []
        try:
            server_cfg.tls_context()   # a certificate that cannot serve: one clear error
            sockets.append(listen(server_cfg.host, server_cfg.port, "public API"))
            sockets.append(listen(server_cfg.admin_host, server_cfg.admin_port, "admin API"))
        except BaseException:
            for sock in sockets:
                sock.close()
            if self._demo_socket is not None:
                self._demo_socket.close()
            raise
        if self._demo_socket is not None:
            sockets.append(self._demo_socket)
            self._demo_socket = None      # the demo upstream's server owns it now
        server_cfg.port = int(sockets[0].getsockname()[1])
        server_cfg.admin_port = int(sockets[1].getsockname()[1])
        read_s, stop_s = server_cfg.read_timeout_s, server_cfg.shutdown_timeout_s
        main = _server(self.gateway.app(), server_cfg.host, server_cfg.port, lifespan="on",
                       tls=server_cfg, read_timeout_s=read_s, shutdown_timeout_s=stop_s)
        admin_app = self.admin.app([r for e in self.extensions for r in e.admin_routes])
        admin = _server(admin_app, server_cfg.admin_host, server_cfg.admin_port,
                        lifespan="off", tls=server_cfg, read_timeout_s=read_s,
                        shutdown_timeout_s=stop_s)
        self.servers += [main, admin]
        if self.demo_port is not None:
            self.servers.append(_server(create_demo_upstream(), "127.0.0.1", self.demo_port,
                                        lifespan="off", keepalive_s=DEMO_UPSTREAM_KEEPALIVE_S,
                                        shutdown_timeout_s=stop_s))
        tasks = [asyncio.create_task(s.serve(sockets=[sock]))
                 for s, sock in zip(self.servers, sockets, strict=True)]
        # The gateway's servers stop first; the demo upstream only once they have
        # answered what they had, since those answers may still need it.
        front, back = tasks[:GATEWAY_SERVERS], tasks[GATEWAY_SERVERS:]
        try:
            with _signals_stop(self):
                while not all(s.started for s in self.servers):
                    if any(t.done() for t in tasks):
                        break
                    await asyncio.sleep(0.01)
                for task in back:
                    if task.done():       # the demo upstream failed to start: its error
                        await task
                if ready is not None:
                    ready.set()
                await asyncio.gather(*front)
                for server in self.servers[GATEWAY_SERVERS:]:
                    server.should_exit = True
                await asyncio.gather(*back)
        finally:
            for server in self.servers:
                server.should_exit = True

    def stop(self, *, force: bool = False) -> None:
        """Stop serving: the gateway's servers stop taking connections and answer what
        they have (up to ``server.shutdown_timeout_s``), then the demo upstream stops.
        ``force``: cancel the requests under way at once."""
        self.stopping = True
        for server in self.servers[:GATEWAY_SERVERS]:
            server.should_exit = True
            server.force_exit = server.force_exit or force
        if force:
            for server in self.servers[GATEWAY_SERVERS:]:
                server.should_exit = server.force_exit = True


class StackThread:
    """A :class:`Stack` on its own event loop in a background thread (demo and tests)."""

    def __init__(self, stack: Stack) -> None:
        import threading

        self.stack = stack
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="distillguard-stack",
                                        daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        ready = asyncio.Event()

        async def main() -> None:
            task = asyncio.create_task(self.stack.serve(ready))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():       # it failed to start: its error is recorded below first
                await task
            self._ready.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the caller of start()
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def start(self, timeout: float = 30.0) -> StackThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gateway did not start in time")
        if isinstance(self._error, ConfigError):      # an address it cannot listen on
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"the gateway failed to start: {self._error!r}")
        if not all(s.started for s in self.stack.servers):
            raise RuntimeError("the gateway failed to start (port in use?)")
        return self

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the stack's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.stack.stop)
            self._thread.join(timeout)
