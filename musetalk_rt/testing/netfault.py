"""A TCP proxy that can drop the network under its open connections (tests).

A dropped network (a Wi-Fi that went away, a switch unplugged) does not close a TCP connection:
both ends keep a socket that looks open, and nothing arrives. :class:`FreezingProxy` makes that
on loopback: it forwards connections to a target until :meth:`FreezingProxy.freeze`, after which
the connections open at that moment carry nothing either way and stay open, while new ones are
forwarded as before (the network is back for whoever connects again).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class FreezingProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` on a thread of its own.

    Args:
        target_host: Where connections go.
        target_port: Its port.

    Use as a context manager; :attr:`port` is the proxy's port once entered.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._frozen: set[int] = set()
        self._open: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freezing-proxy", daemon=True)

    def __enter__(self) -> FreezingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def freeze(self) -> int:
        """Stop every connection open now, both ways, leaving it open; returns how many."""
        frozen = set(self._open)
        self._frozen |= frozen
        return len(frozen)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def start():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        loop.run_until_complete(start())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cid = self.connections
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._open.add(cid)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if cid in self._frozen:  # the network is gone: hold on, say nothing
                        await asyncio.Event().wait()
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        finally:
            self._open.discard(cid)
