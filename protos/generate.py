"""Regenerate the committed Python stubs from ``protos/tiller/v1/*.proto``.

Usage: ``python -m tiller.protos.generate [--out DIR]``. Needs ``grpcio-tools`` (the ``dev`` extra).
The generated gRPC module imports its message module as ``tiller.v1``; it is rewritten to the
installed package path ``tiller.protos.tiller.v1`` (stubs import from the ``tiller`` namespace).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "tiller" / "v1"
_IMPORT = re.compile(r"^from tiller\.v1 import", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every proto into ``out_dir``."""
    from grpc_tools import protoc  # dev-only dependency

    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "tiller" / "v1").iterdir()):
            text = _IMPORT.sub("from tiller.protos.tiller.v1 import", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    out = parser.parse_args().out
    for path in generate(out):
        print(path)


if __name__ == "__main__":
    main()
    shutil.rmtree(PROTO_DIR / "__pycache__", ignore_errors=True)
