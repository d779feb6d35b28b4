"""A private Docker engine for tests, and the tiny images they run (nothing is ever pulled).

The engine runs with no bridge, no iptables and no forwarding: test containers use the host network and
bind 127.0.0.1 only. Each test image is Debian's static busybox plus a page naming its version, imported
from a tar made here; `busybox httpd` serves it on the loopback port the provider hands over in $PORT.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
REPO = "turnout-test/web"
# Serve /www on the port the provider chose; exec so `docker kill` reaches httpd itself.
SERVE = ["/bin/busybox", "sh", "-c", "exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /www"]
# An image that never gets healthy: it prints why and exits, as a misconfigured release would.
BROKEN = ["/bin/busybox", "sh", "-c", "echo 'starting web'; echo 'fatal: DATABASE_URL is not set' >&2; exit 3"]


def find_dockerd() -> str | None:
    return shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None)


class Dockerd:
    """One dockerd with its own data root, exec root and socket under a temporary directory."""

    def __init__(self, root: Path | None = None, live_restore: bool = False) -> None:
        # Short paths: containerd's sockets live under the exec root and unix socket paths are limited.
        self.root = root or Path(tempfile.mkdtemp(prefix="tdk-", dir="/tmp"))
        self.live_restore = live_restore
        self.sock = self.root / "d.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __repr__(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else "stopped"
        return f"<Dockerd {self.url} [{state}]>"

    @property
    def env(self) -> dict[str, str]:
        # The docker CLI here may be newer than the engine; pin the engine's API version for it.
        return {**os.environ, "DOCKER_HOST": self.url, "DOCKER_API_VERSION": "1.41"}

    def start(self, timeout: float = 60.0) -> None:
        dockerd = find_dockerd()
        assert dockerd is not None
        args = [dockerd, "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"), "-H", self.url]
        if self.live_restore:
            args.append("--live-restore")
        self._log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.sock.exists() and self.ping():
                return
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not answer within {timeout}s: {self.log_tail()}")

    def ping(self) -> bool:
        import docker

        try:
            client = docker.DockerClient(base_url=self.url, version="auto", timeout=5)
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.url, version="auto", timeout=30)

    def stop(self) -> None:
        """Stop the engine (with live_restore its containers keep running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Remove every container, stop the engine, delete its files."""
        if self.proc is not None and self.ping():
            with contextlib.suppress(Exception):
                client = self.client()
                for c in client.containers.list(all=True):
                    c.remove(force=True)
                client.close()
        self.stop()
        # The containerd this engine started outlives it with live restore; stop it by its recorded pid.
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.root / "exec" / "containerd" / "containerd.pid").read_text().strip())
            # Only if that pid is still this engine's containerd (pids get reused).
            if str(self.root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        # The engine leaves mounts under its roots (its network namespace, overlay layers): lazily unmount
        # them, deepest first, or the directory cannot be removed.
        with contextlib.suppress(OSError):
            points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            for point in sorted((p for p in points if p.startswith(f"{self.root}/")), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def rootfs_tar(page: str) -> bytes:
    """A root file system with busybox and /www/index.html holding `page`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "www", "tmp"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)
        data = page.encode()
        info = tarfile.TarInfo("www/index.html")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def import_image(client: Any, tag: str, page: str, cmd: list[str]) -> str:
    """Import a test image as `REPO:tag`; returns the digest pin turnout accepts for it."""
    import json

    change = f"CMD {json.dumps(cmd)}"
    client.api.import_image_from_data(rootfs_tar(page), repository=REPO, tag=tag, changes=[change])
    image_id = client.images.get(f"{REPO}:{tag}").id
    return f"{REPO}@{image_id}"
