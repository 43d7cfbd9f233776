"""A private redis-server child process, for `pointmesh up` and for tests that need a real Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

LOG_FILE_NAME = "redis.log"


def ensure_redis_binary() -> str:
    """Finds redis-server, naming the fix in the error because a bare FileNotFoundError helps no one."""
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server was not found on PATH; run `make setup` to install it")
    return path


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Returns a loopback port that was free a moment ago (another process may still take it).
    Never the same port twice in one process: the kernel may offer a port again once its probe
    socket is closed, and two servers told the same port collide."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _command(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command)
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        reply += chunk
    return reply


def _read_bulk(sock: socket.socket, first: bytes) -> bytes:
    """Reads a whole RESP bulk string whose header line is at the start of `first`."""
    header, _, body = first.partition(b"\r\n")
    if not header.startswith(b"$"):
        raise ConnectionError(f"unexpected redis reply {header!r}")
    length = int(header[1:])
    while len(body) < length + 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        body += chunk
    return body[:length]


class RedisServer:
    """Runs redis-server on loopback with its data and log in data_dir; pause() simulates an outage."""

    def __init__(self, port: int, data_dir: Path, *, appendonly: bool = True) -> None:
        self.port = port
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    def _args(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.log_path.resolve()),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Starts redis-server and returns once it answers PING and is the process we started."""
        if self._process is not None:
            raise RuntimeError("redis-server already started")
        binary = ensure_redis_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Its own session, so a Ctrl-C meant for `pointmesh up` does not kill Redis before the services drain.
        self._process = subprocess.Popen(
            self._args(binary),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._process.returncode}:\n{self._log_tail()}")
            if self._answers_ping():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s")
            time.sleep(0.02)
        served_by = self._served_by_pid()
        if served_by != self._process.pid:
            raise RuntimeError(f"port {self.port} is answered by another redis-server (pid {served_by})")

    def _answers_ping(self) -> bool:
        """True on +PONG; a Redis still loading its AOF answers -LOADING and is not ready yet."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                return _command(sock, b"PING\r\n").startswith(b"+PONG")
        except OSError:
            return False

    def _served_by_pid(self) -> int | None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            info = _read_bulk(sock, _command(sock, b"INFO server\r\n"))
        for line in info.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
        return None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def pause(self) -> None:
        """Freezes the process: connections stay open but nothing answers, like a network partition."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        os.kill(self._process.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM lets Redis flush its AOF; SIGKILL only if it has not exited within `timeout`."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            if self._paused:
                # A stopped process only acts on SIGTERM once continued.
                os.kill(process.pid, signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None
        self._paused = False

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> RedisServer:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
