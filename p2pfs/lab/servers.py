"""Real origin servers in lab hosts: moto's S3 API server and nginx, each its own process.

Both run with ``host.popen`` in a host's network namespace, bound to the host's
address, so the lab stops them (and anything they fork) when it closes, even after
a failed test. Their configs and logs are in a directory of the lab's
(``Lab.scratch_dir``) unless given one. Nothing here imports boto3: S3 requests are
made by a Python run *in a lab host* (``S3Server.call``), the only place the server's
address can be reached from.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .netns import Host
from .plumbing import LabError

S3_PORT = 9000
HTTP_PORT = 8080
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
# moto accepts any credentials; these are the ones its documentation uses.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Asks ADDR:PORT for "/" once: exit 0 if an HTTP status line comes back.
_PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: lab\\r\\n\\r\\n")
        s.settimeout(2)
        sys.exit(0 if s.recv(16).startswith(b"HTTP/") else 1)
except OSError:
    sys.exit(1)
"""


def _clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment) without proxies: lab addresses are direct."""
    env = dict(os.environ if base is None else base)
    return {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}


def _workdir(host: Host, kind: str, port: int, workdir: Path | None) -> Path:
    d = workdir or host.lab.scratch_dir(f"{kind}-{host.name}-{port}")
    d.mkdir(parents=True, exist_ok=True)
    return d


class _Server(abc.ABC):
    """A server process in a lab host: started, probed until it answers, stopped."""

    kind = "server"

    def __init__(self, host: Host, port: int, workdir: Path) -> None:
        self.host = host
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.host.address

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The server's command line."""

    def _env(self) -> dict[str, str]:
        return _clean_env()

    def start(self) -> None:
        """Start (or restart after ``stop``/``kill``); return once it answers HTTP."""
        if self.running():
            return
        with open(self.log_path, "ab") as log:
            self.proc = self.host.popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, env=self._env()
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(
                    f"{self.kind} on {self.host.name} ({self.address}:{self.port}) did not "
                    f"start:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def answers(self) -> bool:
        """Whether an HTTP request to the server gets a status line (asked from its host)."""
        probe = [sys.executable, "-c", _PROBE, self.address, str(self.port)]
        return self.host.run(probe, timeout=10, env=_clean_env()).returncode == 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's process group (workers too) and wait; SIGKILL after 5 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # host.popen gave it a session: pgid == pid
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill(self) -> None:
        """Die at once (SIGKILL), as a crashed server does."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class S3Server(_Server):
    """moto's standalone S3 API server (``moto_server``); in-memory, so a restart is empty."""

    kind = "moto"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.port}"

    def _argv(self) -> list[str]:
        script = Path(sys.executable).with_name("moto_server")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
        return [*cmd, "-H", self.address, "-p", str(self.port)]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a process that talks to this server (a daemon, the CLI):
        ``base`` (default: ours) without proxies or other AWS settings, with the dummy
        credentials and region moto takes."""
        env = {k: v for k, v in _clean_env(base).items() if not k.startswith("AWS_")}
        return env | S3_CREDENTIALS | {"AWS_EC2_METADATA_DISABLED": "true"}

    def call(self, code: str, via: Host | None = None, timeout: float = 120) -> Any:
        """Run boto3 ``code`` in host ``via`` (default: the server's own) and return
        its ``result`` (JSON-able; datetimes become strings). In ``code``, ``s3`` is a
        client of this server and ``endpoint`` its URL."""
        prelude = (
            "import boto3, json\n"
            "from botocore.config import Config\n"
            f"endpoint = {self.endpoint!r}\n"
            "s3 = boto3.client('s3', endpoint_url=endpoint,"
            " config=Config(s3={'addressing_style': 'path'}))\n"
            "result = None\n"
        )
        epilogue = "\nprint('\\n' + json.dumps(result, default=str))\n"
        proc = (via or self.host).run(
            [sys.executable, "-"],  # on stdin: code may be longer than an argument can be
            input=prelude + code + epilogue,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
        )
        if proc.returncode != 0:
            raise LabError(f"boto3 in {(via or self.host).name} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.rstrip("\n").rsplit("\n", 1)[-1])

    def create_bucket(self, name: str, via: Host | None = None) -> None:
        self.call(f"s3.create_bucket(Bucket={name!r})", via=via)


def start_s3(host: Host, port: int = S3_PORT, *, workdir: Path | None = None) -> S3Server:
    """moto's S3 server in ``host``, on ``host.address:port``; returns once it answers."""
    server = S3Server(host, port, _workdir(host, "moto", port, workdir))
    server.start()
    return server


class HttpServer(_Server):
    """nginx serving a directory read-only (GET and HEAD), with ETags, no listings."""

    kind = "nginx"

    def __init__(self, host: Host, port: int, workdir: Path, root: Path) -> None:
        super().__init__(host, port, workdir)
        self.root = root
        self.conf_path = workdir / "nginx.conf"
        self.access_log = workdir / "access.log"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def _argv(self) -> list[str]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.conf_path.write_text(self._config(nginx))
        # -e: the error log before the config is read; -p: relative paths stay ours.
        err = self.workdir / "error.log"
        return [nginx, "-p", f"{self.workdir}/", "-e", str(err), "-c", str(self.conf_path)]

    def _config(self, nginx: str) -> str:
        d = self.workdir
        temps = []
        built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            if kind == "client_body" or f"--without-http_{kind}_module" not in built:
                (d / "tmp" / kind).mkdir(parents=True, exist_ok=True)
                temps.append(f'    {kind}_temp_path "{d}/tmp/{kind}";')
        temp_lines = "\n".join(temps)
        # As root, workers stay root: a test's files are often in a private (0700) tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid "{d}/nginx.pid";
error_log "{d}/error.log" notice;
events {{ worker_connections 512; }}
http {{
    log_format lab '$remote_addr "$request" $status $body_bytes_sent';
    access_log "{self.access_log}" lab;
{temp_lines}
    default_type application/octet-stream;
    types {{ }}
    sendfile on;
    etag on;
    autoindex off;
    server_tokens off;
    server {{
        listen {self.address}:{self.port};
        server_name _;
        root "{self.root}";
        location / {{
            limit_except GET {{ deny all; }}
        }}
    }}
}}
"""

    def log(self) -> str:
        parts = [super().log()]
        err = self.workdir / "error.log"
        if err.exists():
            parts.append(err.read_text(errors="replace"))
        return "\n".join(p for p in parts if p)

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(client address, request line, status, body bytes) per request served so far."""
        out: list[tuple[str, str, int, int]] = []
        try:
            text = self.access_log.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            m = re.fullmatch(r'(\S+) "(.*)" (\d+) (\d+)', line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4))))
        return out


def start_nginx(
    host: Host, root: Path, port: int = HTTP_PORT, *, workdir: Path | None = None
) -> HttpServer:
    """nginx in ``host`` serving ``root`` on ``host.address:port``; returns once it answers."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise LabError(f"nginx root {root} is not a directory")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise LabError("nginx is not installed (Debian package nginx-light: .ci/system-deps)")
    server = HttpServer(host, port, _workdir(host, "nginx", port, workdir), root)
    server.start()
    return server
