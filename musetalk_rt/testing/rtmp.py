"""A real RTMP server for tests and dry runs: Debian's nginx with its rtmp module, on loopback.

``RtmpServer`` writes a minimal configuration into a temporary folder and runs nginx in the
foreground (``daemon off``) as a child process; ``restart()`` stops and starts it again on the
same port (to test reconnection). Needs the packages ``nginx`` and ``libnginx-mod-rtmp``, or
the same nginx unpacked anywhere: ``MUSETALK_RT_NGINX`` names the nginx to run and
``MUSETALK_RT_NGINX_RTMP_MODULE`` its ``ngx_rtmp_module.so``.

On a host without package access (a GPU machine), :func:`unpack_debs` extracts downloaded
``.deb`` files (nginx, its rtmp module and the libraries they link, glibc included) into a
private prefix and writes a launcher that runs that nginx with the prefix's own dynamic loader
and libraries, whatever the host's glibc::

    python -m musetalk_rt.testing.rtmp unpack .debs /tmp/nginx-root   # prints the two exports
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_rtmp_module.so",)
NGINX_ENV = "MUSETALK_RT_NGINX"
MODULE_ENV = "MUSETALK_RT_NGINX_RTMP_MODULE"

CONFIG = """daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
load_module {module};
events {{ worker_connections 64; }}
rtmp {{
    # the rtmp module's default access log is /var/log/nginx/access.log, absent where nginx
    # is unpacked privately (a GPU host): keep it in the prefix
    access_log {prefix}/rtmp_access.log;
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


def find_nginx() -> tuple[str | None, str | None]:
    """``(nginx, rtmp module)``: the environment's choice, else the installed packages'."""
    nginx = os.environ.get(NGINX_ENV) or shutil.which("nginx")
    module = os.environ.get(MODULE_ENV) or next(
        (p for p in MODULE_PATHS if Path(p).is_file()), None
    )
    return nginx, module


def rtmp_available() -> str | None:
    """None when nginx and its rtmp module can be found, else what is missing."""
    nginx, module = find_nginx()
    if nginx is None or not Path(nginx).is_file():
        return (
            f"nginx is not installed (apt-get install nginx libnginx-mod-rtmp, or set {NGINX_ENV})"
        )
    if module is None or not Path(module).is_file():
        return (
            "nginx's rtmp module is not installed (apt-get install libnginx-mod-rtmp, or set "
            f"{MODULE_ENV})"
        )
    return None


def _extract_deb(deb: Path, prefix: Path) -> None:
    """``dpkg-deb -x`` when it exists, else the same in Python (ar archive, data.tar.*)."""
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(prefix)], check=True)
        return
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            import io

            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                try:
                    tar.extractall(prefix, filter="tar")  # refuses paths outside the prefix
                except TypeError:  # a Python without extraction filters
                    tar.extractall(prefix)
            return
        pos += 60 + size + size % 2
    raise ValueError(f"{deb} holds no data.tar member")


def unpack_debs(debs_dir: str | Path, prefix: str | Path) -> tuple[Path, Path]:
    """Unpack every ``.deb`` of ``debs_dir`` into ``prefix`` and write an nginx launcher.

    The launcher (``prefix/bin/nginx``) runs the unpacked nginx with the unpacked dynamic
    loader and libraries when glibc was among the packages (so the host's glibc version does
    not matter), else with ``LD_LIBRARY_PATH`` pointing into the prefix.

    Args:
        debs_dir: Folder of ``.deb`` files (nginx, libnginx-mod-rtmp, libraries).
        prefix: Private folder to unpack into (created; never ``/``).

    Returns:
        ``(launcher, rtmp module)``.

    Raises:
        ValueError: No .deb files, or no nginx or rtmp module among them.
    """
    debs = sorted(Path(debs_dir).glob("*.deb"))
    if not debs:
        raise ValueError(f"no .deb files in {debs_dir}")
    root = Path(prefix).resolve()
    if root == Path("/"):
        raise ValueError("refusing to unpack into /")
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _extract_deb(deb, root)
    nginx = root / "usr/sbin/nginx"
    module = root / "usr/lib/nginx/modules/ngx_rtmp_module.so"
    for path, pkg in ((nginx, "nginx"), (module, "libnginx-mod-rtmp")):
        if not path.is_file():
            raise ValueError(f"{path.relative_to(root)} not found: is {pkg} among the .debs?")
    libdirs = [
        str(d)
        for d in (root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu")
        if d.is_dir()
    ]
    loader = next(
        (
            d / "ld-linux-x86-64.so.2"
            for d in map(Path, libdirs)
            if (d / "ld-linux-x86-64.so.2").is_file()
        ),
        None,
    )
    (root / "bin").mkdir(exist_ok=True)
    launcher = root / "bin/nginx"
    path = ":".join(libdirs)
    if loader is not None:
        body = f'exec "{loader}" --library-path "{path}" "{nginx}" "$@"\n'
    else:
        body = (
            f'export LD_LIBRARY_PATH="{path}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n'
            f'exec "{nginx}" "$@"\n'
        )
    launcher.write_text(
        "#!/bin/sh\n# nginx unpacked from .deb files (musetalk_rt.testing.rtmp)\n" + body
    )
    launcher.chmod(0o755)
    return launcher, module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtmpServer:
    """nginx-rtmp on ``127.0.0.1:port``, application ``live``.

    Args:
        port: TCP port (default: a free one).
        nginx: The nginx executable (default: ``$MUSETALK_RT_NGINX``, else ``nginx`` on PATH).
        module: Its ``ngx_rtmp_module.so`` (default: ``$MUSETALK_RT_NGINX_RTMP_MODULE``, else
            the Debian package's).
    """

    def __init__(
        self, port: int | None = None, nginx: str | None = None, module: str | None = None
    ):
        found_nginx, found_module = find_nginx()
        self.nginx, module = nginx or found_nginx, module or found_module
        if nginx is None or module is None:
            missing = rtmp_available()
            if missing:
                raise RuntimeError(missing)
        self.port = port or free_port()
        self.prefix = Path(tempfile.mkdtemp(prefix="rtmp-"))
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(CONFIG.format(prefix=self.prefix, module=module, port=self.port))
        self.proc: subprocess.Popen | None = None

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self, timeout_s: float = 10.0) -> RtmpServer:
        # nginx reports start-up errors (before its error_log is open) on stderr: keep them
        with open(self.prefix / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(
                [self.nginx, "-p", str(self.prefix), "-c", str(self.conf)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    said = " ".join(
                        (self.prefix / name).read_text(errors="replace").strip()[-500:]
                        for name in ("stderr.log", "error.log")
                        if (self.prefix / name).exists()
                    )
                    raise RuntimeError(
                        f"nginx exited with status {self.proc.returncode}: "
                        f"{said or 'no message'} ({self.nginx} -c {self.conf})"
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


def main(argv: list[str] | None = None) -> int:
    """``python -m musetalk_rt.testing.rtmp unpack DEBS_DIR PREFIX``: print the exports."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "unpack":
        print("usage: python -m musetalk_rt.testing.rtmp unpack DEBS_DIR PREFIX", file=sys.stderr)
        return 2
    try:
        launcher, module = unpack_debs(args[1], args[2])
    except (ValueError, OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        print(f"rtmp unpack: error: {exc}", file=sys.stderr)
        return 2
    print(f"export {NGINX_ENV}={launcher}")
    print(f"export {MODULE_ENV}={module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
