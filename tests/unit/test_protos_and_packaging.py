"""Committed stubs match the protos; the wheel installs under the tiller namespace only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tiller.protos.generate import PROTO_DIR, generate

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_have_not_drifted(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{path.name} is not committed"
        assert committed.read_text() == path.read_text(), (
            f"{path.name} drifted from the .proto: run python -m tiller.protos.generate"
        )


def test_stubs_import_from_the_tiller_namespace() -> None:
    grpc_stub = (PROTO_DIR / "tiller_pb2_grpc.py").read_text()
    assert "from tiller.protos.tiller.v1 import tiller_pb2" in grpc_stub


def test_wheel_layout_and_base_dependencies(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("tiller-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith("METADATA"))
        metadata = z.read(meta).decode()
    tops = {n.split("/")[0] for n in names if not n.startswith("tiller-")}
    assert tops == {"tiller"}, f"bare top-level modules in the wheel: {tops}"
    for pkg in ("server", "client", "learner", "protos"):
        assert f"tiller/{pkg}/__init__.py" in names
    assert "tiller/protos/tiller/v1/tiller.proto" in names
    base = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    names_only = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip() for d in base)
    assert names_only == ["click", "grpcio", "protobuf"]


def test_client_imports_without_torch_or_vllm() -> None:
    code = (
        "import sys; import tiller.client, tiller.client.cli; "
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
