"""`make load`: a bounded Locust run against pointmesh on 127.0.0.1, summary printed.

Without --target it starts the platform itself (`pointmesh up` on free ports in a temporary
data directory), makes a POS and a web API key and a pool of members, runs the REST scenario
(and the gRPC one with --grpc) headless for --run-time with --users users, then stops
everything. With --target it runs against a platform already up (keys and ledger address
given). Distributed mode is Locust's own: start `locust -f loadtests/rest.py --master` and
`locust -f loadtests/rest.py --worker` processes with the same environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
MAX_USERS = 500


def _post(url: str, key: str, body: dict[str, object], idem: str) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Idempotency-Key": idem})  # fmt: skip
    with urllib.request.urlopen(request, timeout=15) as response:
        found: dict[str, object] = json.loads(response.read())
        return found


def make_members(target: str, key: str, count: int, run: str) -> list[str]:
    return [str(_post(f"{target}/v1/members", key, {}, f"lt-{run}-m{i}")["member_id"]) for i in range(count)]


def locust(args: argparse.Namespace, target: str, env: dict[str, str]) -> int:
    files = ["loadtests/rest.py"] + (["loadtests/grpc_user.py"] if args.grpc else [])
    command = [sys.executable, "-m", "locust", "-f", ",".join(files), "--headless", "-u", str(args.users),
               "-r", str(args.spawn_rate), "-t", args.run_time, "--host", target, "--stop-timeout", "5",
               "--only-summary"]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, **env}, timeout=_seconds(args.run_time) + 120
    ).returncode


def _seconds(text: str) -> int:
    unit = {"s": 1, "m": 60, "h": 3600}[text[-1]] if text[-1] in "smh" else 1
    return int(text.rstrip("smh")) * unit


def _wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--run-time", default="20s", help="e.g. 20s, 2m (the run stops by itself)")
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--grpc", action="store_true", help="also run the gRPC user against ledger_svc")
    parser.add_argument("--target", default="", help="a running gateway, http://127.0.0.1:PORT")
    parser.add_argument("--ledger", default="", help="with --target: the ledger's 127.0.0.1:PORT")
    parser.add_argument("--pos-key", default="")
    parser.add_argument("--web-key", default="")
    parser.add_argument(
        "--receipt-time-offset",
        type=float,
        default=0.0,
        help="seconds added to now for receipt times (a ledger on another clock)",
    )
    args = parser.parse_args()
    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be 1..{MAX_USERS}")
    if args.target and urlparse(args.target).hostname != "127.0.0.1":
        parser.error("load tests target 127.0.0.1 only")
    with tempfile.TemporaryDirectory(prefix="pointmesh-load-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> int:
    from pointmesh.redis_server import free_port

    up = None
    target, ledger, pos_key, web_key = args.target, args.ledger, args.pos_key, args.web_key
    if not target:
        from gateway.app import key_store
        from pointmesh.config import load_settings

        ports = {name: free_port() for name in ("gateway", "ledger", "rules", "fraud", "redis")}
        env = {**os.environ, "POINTMESH_DATA_DIR": str(tmp / "data"), "POINTMESH_REDIS_PORT": str(ports["redis"]),
               "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{ports['ledger']}", "POINTMESH_RULES_ADDR": f"127.0.0.1:{ports['rules']}",
               "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{ports['fraud']}", "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{ports['gateway']}",
               "POINTMESH_LEDGER_METRICS_PORT": "0", "POINTMESH_RULES_METRICS_PORT": "0", "POINTMESH_FRAUD_METRICS_PORT": "0",
               "POINTMESH_LOG_LEVEL": "WARNING", "POINTMESH_DEFAULT_MODEL_ROWS": "20000"}  # fmt: skip
        env.pop("POINTMESH_REDIS_URL", None)
        store = key_store(load_settings(env))
        scopes = ["purchases:write", "members:read", "members:write", "redemptions:write"]
        pos_key = store.create("pos", scopes, ["HEL-01"], "load test pos")[0]
        web_key = store.create("web", scopes, [], "load test web")[0]
        store.close()
        up = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "up"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        for port in ports.values():
            _wait_port(port, timeout=120)
        target, ledger = f"http://127.0.0.1:{ports['gateway']}", f"127.0.0.1:{ports['ledger']}"
    try:
        members = make_members(target, pos_key, args.members, str(int(time.time())))
        pool = tmp / "members.json"
        pool.write_text(json.dumps(members))
        print(f"load: {args.users} users for {args.run_time} against {target} ({len(members)} members, Zipf)",
              flush=True)  # fmt: skip
        return locust(args, target, {"LOADTEST_MEMBERS": str(pool), "LOADTEST_POS_KEY": pos_key,
                                     "LOADTEST_WEB_KEY": web_key, "LOADTEST_LEDGER_ADDR": ledger,
                                     "LOADTEST_RECEIPT_TIME_OFFSET": str(args.receipt_time_offset)})  # fmt: skip
    finally:
        if up is not None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
