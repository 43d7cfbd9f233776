"""Runs Apache servers that pointmesh needs in production (Kafka, Cassandra) as local child
processes for development and tests, from jars Maven resolves once.

The project is Python: Java is only these servers' runtime. A small pom in `dev/<name>/`
names the server artifact; `mvn dependency:copy-dependencies` copies it and its runtime
dependencies into a cache outside the repository (POINTMESH_JVM_CACHE, default
~/.cache/pointmesh/jvm), keyed by the pom's hash so a version bump resolves again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Debian packages that provide each tool, installed when missing (like redis-server).
_DEBIAN_PACKAGES = {"java": "openjdk-17-jre-headless", "mvn": "maven"}


def ensure_tool(name: str) -> str:
    """The tool's path, installing its Debian package first when it is missing."""
    found = shutil.which(name)
    if found:
        return found
    package = _DEBIAN_PACKAGES[name]
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {package} from Debian's packages (for `{name}`)", flush=True)
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", package], check=True)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` is still missing after installing {package}")
    return found


def cache_root() -> Path:
    return Path(os.environ.get("POINTMESH_JVM_CACHE", Path.home() / ".cache" / "pointmesh" / "jvm"))


def resolve_classpath(pom_dir: Path) -> str:
    """The server's classpath (a directory glob), resolving the jars on first use."""
    pom = pom_dir / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    lib = cache_root() / f"{pom_dir.name}-{digest}" / "lib"
    done = lib.parent / "resolved"
    if not done.exists():
        mvn = ensure_tool("mvn")
        ensure_tool("java")
        lib.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib}"],
            check=True,
        )
        done.write_text(f"resolved in {time.monotonic() - started:.1f}s\n")
    return f"{lib}/*"


def run_java(classpath: str, args: Sequence[str]) -> None:
    """A short-lived Java tool (e.g. formatting storage); its output only matters on failure."""
    done = subprocess.run([ensure_tool("java"), "-cp", classpath, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class JvmExited(RuntimeError):
    """The JVM ended before opening its port; `log` is what it wrote during this start (the
    log's tail alone may be shutdown noise that hides why it stopped)."""

    def __init__(self, name: str, returncode: int, log: str) -> None:
        causes = [line for line in log.splitlines() if "Exception" in line or " ERROR " in line][:5]
        tail = "\n".join(log.splitlines()[-30:])
        super().__init__(f"{name} exited with {returncode}:\n" + "\n".join(causes) + "\n...\n" + tail)
        self.log = log


class JvmProcess:
    """One server JVM with its pid file and log in `data_dir`, started detached so it can
    outlive the command that started it (`pointmesh dev kafka start`) or be owned by a test."""

    def __init__(self, name: str, data_dir: Path) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.pid_file = self.data_dir / f"{name}.pid"
        self.log_path = self.data_dir / f"{name}.log"

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def start(self, args: Sequence[str], ready_port: int, timeout: float, host: str = "127.0.0.1") -> float:
        """Starts the JVM and waits for its port; returns the seconds it took."""
        if self.running_pid() is not None:
            raise RuntimeError(f"{self.name} already runs (pid {self.running_pid()}); stop it first")
        java = ensure_tool("java")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            process = subprocess.Popen([java, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.pid_file.write_text(str(process.pid))
        while not port_open(ready_port, host):
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise JvmExited(self.name, process.returncode, self._log_since(offset))
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"{self.name} did not open port {ready_port} in {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM for a clean shutdown; SIGKILL if it has not exited within `timeout`."""
        pid = self.running_pid()
        if pid is not None:
            self._signal_and_wait(pid, signal.SIGTERM, timeout)
            if self.running_pid() is not None:
                self._signal_and_wait(pid, signal.SIGKILL, 10)
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Like a power cut: no shutdown hooks run."""
        pid = self.running_pid()
        if pid is not None:
            self._signal_and_wait(pid, signal.SIGKILL, 10)
        self.pid_file.unlink(missing_ok=True)

    @staticmethod
    def _signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
