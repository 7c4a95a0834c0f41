"""nginx as the reference reverse proxy: our own process, our own config, a loopback port, one worker.

One worker because the gateway is one asyncio process (one core); keep-alive to the upstream like the gateway's
connection pool; no buffering so it relays as the gateway does. Debian: `apt-get install -y nginx-light` (or nginx).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from bench.loadgen import check_loopback

CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
  # One line per request, as nginx's default does and as our gateway logs by default: same work on both sides.
  access_log {prefix}/access.log;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 100000;
  upstream stub {{ server {upstream}; keepalive 512; keepalive_requests 100000; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://stub;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
    location = /nginx-health {{ return 200 "ok"; }}
  }}
}}
"""


def binary() -> Optional[str]:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def version() -> str:
    exe = binary()
    if not exe:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().split("/")[-1]


class Nginx:
    def __init__(self, prefix: Path, port: int, upstream: str):
        check_loopback(f"http://{upstream}/")
        self.prefix, self.port, self.upstream = prefix, port, upstream
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        exe = binary()
        if exe is None:
            raise RuntimeError("nginx is not installed: apt-get install -y nginx-light (or nginx)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(CONFIG.format(prefix=self.prefix, port=self.port, upstream=self.upstream))
        log = open(self.prefix / "stdout.log", "ab")
        # -e: the compiled-in error log path (/var/log/nginx) may not be writable; ours is set in the config too.
        self.proc = subprocess.Popen(
            [exe, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        for _ in range(100):  # bounded: 10 s
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.prefix / 'error.log').read_text()[-1000:]}")
            try:
                with urllib.request.urlopen(self.url + "/nginx-health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError("nginx did not answer within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its worker and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
