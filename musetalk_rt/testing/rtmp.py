"""A real RTMP server for tests and dry runs: Debian's nginx with its rtmp module, on loopback.

``RtmpServer`` writes a minimal configuration into a temporary folder and runs nginx in the
foreground (``daemon off``) as a child process; ``restart()`` stops and starts it again on the
same port (to test reconnection). Needs the packages ``nginx`` and ``libnginx-mod-rtmp``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_rtmp_module.so",)

CONFIG = """daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
load_module {module};
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
            wait_key on;
            wait_video on;
        }}
    }}
}}
"""


def rtmp_available() -> str | None:
    """None when nginx and its rtmp module are installed, else what is missing."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-rtmp)"
    if not any(Path(p).is_file() for p in MODULE_PATHS):
        return "nginx's rtmp module is not installed (apt-get install libnginx-mod-rtmp)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtmpServer:
    """nginx-rtmp on ``127.0.0.1:port``, application ``live``."""

    def __init__(self, port: int | None = None):
        missing = rtmp_available()
        if missing:
            raise RuntimeError(missing)
        self.port = port or free_port()
        self.prefix = Path(tempfile.mkdtemp(prefix="rtmp-"))
        module = next(p for p in MODULE_PATHS if Path(p).is_file())
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(CONFIG.format(prefix=self.prefix, module=module, port=self.port))
        self.proc: subprocess.Popen | None = None

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self, timeout_s: float = 10.0) -> RtmpServer:
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    log = self.prefix / "error.log"
                    raise RuntimeError(
                        f"nginx exited: {log.read_text()[-500:] if log.exists() else ''}"
                    ) from None
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> RtmpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
