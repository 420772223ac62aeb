"""Generate the Python modules of proto/*.proto, or check that the committed ones are fresh.

    python scripts/gen_proto.py           # rewrite proto/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python scripts/gen_proto.py --check   # exit 1 if they differ from what protoc makes now

The .proto files are compiled under the import path "layerline/proto", the Python
package proto/ installs as. protoc then writes `from layerline.proto import
activation_pb2`, the generated classes name the module they really live in (so
messages pickle), and the descriptor pool holds "layerline/proto/<name>.proto",
which cannot collide with another project's "activation.proto". The output is
protoc's, byte for byte: nothing is patched afterwards.

protoc's output depends on the grpcio-tools version: regenerate with the version
that made the committed modules (their GRPC_GENERATED_VERSION) unless you mean to
move every module to a new one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import resources
from importlib.metadata import version
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
IMPORT_PATH = "layerline/proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The .proto files in `proto_dir`, sorted by name."""
    return sorted(proto_dir.glob("*.proto"))


def run_protoc(proto_dir: Path, out_args: list[str]) -> None:
    """Compile every .proto in `proto_dir` with grpc_tools.protoc and the given output flags."""
    files = proto_files(proto_dir)
    if not files:
        raise FileNotFoundError(f"no .proto files in {proto_dir}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={IMPORT_PATH}={proto_dir}",
        f"--proto_path={well_known}",
        *out_args,
        *(f"{IMPORT_PATH}/{f.name}" for f in files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir}; its messages are above")


def generate(proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """The generated modules for `proto_dir`, by file name, made in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        run_protoc(proto_dir, [f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}"])
        made = Path(tmp, IMPORT_PATH)
        return {p.name: p.read_bytes() for p in sorted(made.iterdir()) if is_generated(p.name)}


def descriptor_set(proto_dir: Path = PROTO_DIR) -> descriptor_pb2.FileDescriptorSet:
    """The compiled descriptors of `proto_dir`, with source info (comments and locations)."""
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        out = Path(tmp, "descriptors.pb")
        run_protoc(proto_dir, [f"--descriptor_set_out={out}", "--include_source_info"])
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def is_generated(name: str) -> bool:
    """Whether a file name is one gen_proto writes."""
    return name.endswith(GENERATED_SUFFIXES)


def committed(proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """The generated modules now in `proto_dir`, by file name."""
    return {p.name: p.read_bytes() for p in sorted(proto_dir.iterdir()) if is_generated(p.name)}


def stale_files(proto_dir: Path = PROTO_DIR) -> list[str]:
    """What is out of date in `proto_dir`: missing, changed or orphaned generated files."""
    want, have = generate(proto_dir), committed(proto_dir)
    problems = []
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            problems.append(f"{name} is missing")
        elif name not in want:
            problems.append(f"{name} has no .proto left to generate it")
        elif want[name] != have[name]:
            problems.append(f"{name} differs from what protoc makes now")
    return problems


def write(proto_dir: Path = PROTO_DIR) -> list[str]:
    """Regenerate the modules in `proto_dir` and delete orphans; return the names written."""
    want = generate(proto_dir)
    for name, content in want.items():
        target = proto_dir / name
        partial = target.with_name(f".{name}.partial")
        partial.write_bytes(content)
        os.replace(partial, target)  # never a half-written module
    for name in committed(proto_dir).keys() - want.keys():
        (proto_dir / name).unlink()
    return sorted(want)


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate, or with --check report stale modules and exit 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if the generated modules are not fresh"
    )
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tools = f"grpcio-tools {version('grpcio-tools')}"
    if args.check:
        problems = stale_files(args.proto_dir)
        for problem in problems:
            print(f"stale: {args.proto_dir / problem}", file=sys.stderr)
        if problems:
            print(
                f"fix: run `python scripts/gen_proto.py` (compiles with {tools}; "
                "another grpcio-tools version also changes the output)",
                file=sys.stderr,
            )
            return 1
        print(f"generated modules are fresh ({tools})")
        return 0
    for name in write(args.proto_dir):
        print(f"wrote {args.proto_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
