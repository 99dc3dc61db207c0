"""Misbehaving ingest senders for tests: what an attacker or a broken client would send."""

from __future__ import annotations


def send_oversized(url: str, hello: str, nbytes: int = 10 * 2**20, timeout_s: float = 10.0) -> int:
    """Say ``hello``, then send one ``nbytes`` message; return the server's close code.

    Uses websockets' threaded client (call it through ``asyncio.to_thread`` from a coroutine):
    the asyncio client, cut off by the server in the middle of a large send, fails in its own
    close (its transport is already gone), although the server answered correctly.

    Raises:
        RuntimeError: The server did not accept the hello.
    """
    import json

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url, max_size=2 * nbytes, open_timeout=timeout_s) as ws:
        ws.send(hello)
        reply = json.loads(ws.recv(timeout=timeout_s))
        if reply.get("type") != "ready":
            raise RuntimeError(f"the server did not accept the hello: {reply}")
        try:
            ws.send(b"\x00" * nbytes)
            for _ in range(10):  # stats may come before the close
                ws.recv(timeout=timeout_s)
        except ConnectionClosed:
            pass
        return ws.close_code
