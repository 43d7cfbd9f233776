"""Profiles the running services with py-spy and keeps a readable summary per service.

Run it while load is on (for instance `pointmesh loadgen --purchases 200000` against a
`pointmesh up` on the loadgen program): it samples each `pointmesh <service> serve` process for
`--seconds`, then writes `<out>/<service>.txt` with the share of samples spent in each function
(inclusive: the function and what it called; own: the function's own code), so a change can be
judged against the profile it was meant to improve. py-spy needs ptrace rights over the
processes (same user, or root).

    python -m benchmarks.profile_mesh --seconds 20 --out benchmarks/profiles
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FRAME = re.compile(r"(?P<func>.*) \((?P<file>.*):\d+\)$")
SERVICES = ("ledger", "rules", "fraud", "gateway")


def pid_of(service: str) -> int | None:
    found = subprocess.run(["pgrep", "-f", f"pointmesh.cli {service} serve"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def summarise(raw: str, top: int = 40) -> str:
    """py-spy's collapsed stacks ("frame;frame;frame count" lines) as inclusive and own shares."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [_name(frame) for frame in stack.split(";")]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "inclusive (function and what it calls):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "own (the function's own code):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top // 2)]
    return "\n".join(lines) + "\n"


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # not a dependency: `pip install py-spy` into the venv
    return str(beside) if beside.exists() else "py-spy"


def _name(frame: str) -> str:
    m = FRAME.match(frame)
    if m is None:
        return frame
    path = m.group("file").split("site-packages/")[-1]
    path = re.sub(r"^.*?/(ledger_svc|rules_svc|fraud_svc|gateway|pointmesh|loadtests)/", r"\1/", path)
    return f"{m.group('func')} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--out", default="benchmarks/profiles")
    parser.add_argument("--services", default="ledger,rules,fraud")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for service in args.services.split(","):
            if service not in SERVICES:
                parser.error(f"unknown service {service!r}")
            pid = pid_of(service)
            if pid is None:
                print(f"profile: no running `pointmesh {service} serve`; skipped", file=sys.stderr)
                continue
            raw = Path(tmp) / f"{service}.raw"
            command = [_py_spy(), "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate), "-f", "raw",
                       "-o", str(raw)]  # fmt: skip
            running[service] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), raw)
        for service, (proc, raw) in running.items():
            _out, err = proc.communicate(timeout=args.seconds + 60)
            if proc.returncode != 0 or not raw.exists():
                print(f"profile: py-spy on {service} failed: {err.decode()[-300:]}", file=sys.stderr)
                continue
            summary = summarise(raw.read_text())
            (out / f"{service}.txt").write_text(summary)
            print(f"== {service} ==\n{summary}")
    return 0 if running else 1


if __name__ == "__main__":
    sys.exit(main())
