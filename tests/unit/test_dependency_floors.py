"""pyproject.toml's grpcio / protobuf floors are at least what the committed stubs require.

The generated stubs check their runtime at import: ``*_pb2_grpc.py`` refuses a grpcio older than
``GRPC_GENERATED_VERSION`` and ``*_pb2.py`` calls ``ValidateProtobufRuntimeVersion(domain,
major, minor, patch, ...)``. A floor below those lets pip install a client that fails on import.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tiller.protos.generate import PROTO_DIR

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# Packages released in lockstep with grpcio (same version numbers).
GRPC_FAMILY = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools")


def grpc_needed() -> Version:
    """The highest ``GRPC_GENERATED_VERSION`` among the committed ``*_pb2_grpc.py``."""
    found = []
    for stub in sorted(PROTO_DIR.glob("*_pb2_grpc.py")):
        m = re.search(r"^GRPC_GENERATED_VERSION = ['\"]([^'\"]+)['\"]", stub.read_text(), re.M)
        assert m, f"{stub.name} states no GRPC_GENERATED_VERSION"
        found.append(Version(m.group(1)))
    assert found, f"no *_pb2_grpc.py in {PROTO_DIR}"
    return max(found)


def protobuf_needed() -> Version:
    """The highest runtime version the committed ``*_pb2.py`` validate at import."""
    found = []
    for stub in sorted(PROTO_DIR.glob("*_pb2.py")):
        for node in ast.walk(ast.parse(stub.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "ValidateProtobufRuntimeVersion"
            ):
                major, minor, patch = (ast.literal_eval(a) for a in node.args[1:4])
                found.append(Version(f"{major}.{minor}.{patch}"))
    assert found, f"no ValidateProtobufRuntimeVersion call in {PROTO_DIR}/*_pb2.py"
    return max(found)


def floor(req: Requirement) -> Version | None:
    """The lowest version ``req`` admits (``>=``, ``==``, ``~=``; ``==X.*`` counts as X)."""
    lows = [
        Version(s.version.removesuffix(".*"))
        for s in req.specifier
        if s.operator in (">=", "==", "~=", "===")
    ]
    return max(lows, default=None)


def floor_problems(pyproject: str) -> list[str]:
    """Every grpc-family / protobuf requirement (base and extras) whose floor is missing or
    below what the stubs need; the base dependencies must name grpcio and protobuf."""
    project = tomllib.loads(pyproject)["project"]
    needed = {name: grpc_needed() for name in GRPC_FAMILY} | {"protobuf": protobuf_needed()}
    groups = {"dependencies": project["dependencies"]} | {
        f"[{extra}]": reqs for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    problems = []
    base = {Requirement(r).name for r in project["dependencies"]}
    problems += [f"dependencies lack {n}" for n in ("grpcio", "protobuf") if n not in base]
    for group, reqs in groups.items():
        for req in map(Requirement, reqs):
            if req.name not in needed:
                continue
            low = floor(req)
            if low is None or low < needed[req.name]:
                problems.append(f"{group}: {req} admits below {req.name} {needed[req.name]}")
    return problems


def test_the_installed_runtime_meets_what_the_stubs_state() -> None:
    from importlib.metadata import version

    assert Version(version("grpcio")) >= grpc_needed()
    assert Version(version("protobuf")) >= protobuf_needed()


def test_pyproject_floors_cover_the_stubs() -> None:
    assert floor_problems(PYPROJECT.read_text()) == []


@pytest.mark.parametrize(
    ("name", "lowered"),
    [
        ("grpcio", "1.66"),
        ("protobuf", "5.27"),
        ("grpcio-health-checking", "1.66"),
        ("grpcio-reflection", "1.66"),
        ("grpcio-tools", "1.66"),
    ],
)
def test_a_lowered_floor_fails(name: str, lowered: str) -> None:
    text = PYPROJECT.read_text()
    pattern = re.compile(rf'"{re.escape(name)}>=[^"]+"')
    assert pattern.search(text), f"{name} has no >= floor in pyproject.toml"
    problems = floor_problems(pattern.sub(f'"{name}>={lowered}"', text))
    assert problems and all(name in p for p in problems), problems


def test_a_missing_floor_or_dependency_fails() -> None:
    text = PYPROJECT.read_text()
    unbounded = re.sub(r'"protobuf>=[^"]+"', '"protobuf"', text)
    assert any("protobuf" in p for p in floor_problems(unbounded))
    dropped = re.sub(r'\s*"grpcio>=[^"]+",', "", text, count=1)
    assert "dependencies lack grpcio" in floor_problems(dropped)
