"""Generates the committed protobuf code, or checks that the committed code is current.

One generator for `make protos` and CI, so the check compares like with like.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_DIR = Path("pointmesh") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    """Runs protoc with the python, grpc and mypy-protobuf plugins into out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "pointmesh" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    # The mypy-protobuf plugins are console scripts installed next to this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_dir / GENERATED_DIR / "__init__.py"
    init.write_text('"""Generated protobuf code for pointmesh.v1; regenerate with `make protos`."""\n')


def generated_files(base: Path) -> dict[str, Path]:
    folder = base / GENERATED_DIR
    return {p.name: p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py"}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        committed = generated_files(ROOT)
        problems = sorted(set(fresh) ^ set(committed))
        problems += [n for n in sorted(set(fresh) & set(committed)) if not filecmp.cmp(fresh[n], committed[n], False)]
    if problems:
        print("generated code is stale; run `make protos` and commit:", ", ".join(problems), file=sys.stderr)
        return 1
    print(f"generated code matches protos/ ({len(fresh)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
