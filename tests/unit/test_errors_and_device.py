"""The error table and the device-dependent engine defaults."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tiller.server import errors
from tiller.server.device import resolve_dtype
from tiller.server.formats.hardware import cpu_has_native_bf16


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Aborted, grpc.StatusCode.ABORTED),
        (errors.EngineFailure, grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(error: type[errors.TillerError], code: grpc.StatusCode) -> None:
    assert errors.grpc_status(error("m")) == code


def test_subclasses_inherit_their_parents_code() -> None:
    from tiller.server.formats.manifest import ManifestError

    assert errors.grpc_status(ManifestError("bad")) == grpc.StatusCode.INVALID_ARGUMENT


def test_every_error_class_is_in_the_table() -> None:
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.TillerError) and c is not errors.TillerError
    ]
    assert set(classes) == set(errors.STATUS_TABLE)


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "float32"),  # AVX2-only CPU: bf16 is emulated, 5x slower
        ("auto", False, True, "auto"),
        ("auto", True, False, "auto"),
        ("bfloat16", False, False, "bfloat16"),  # an explicit choice is kept
    ],
)
def test_dtype_choice(requested: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert resolve_dtype(requested, has_cuda=cuda, cpu_bf16=bf16) == expected


def test_cpuinfo_flags(tmp_path: Path) -> None:
    avx2, bf16 = tmp_path / "avx2", tmp_path / "bf16"  # one file each: read once per path
    avx2.write_text("processor: 0\nflags\t\t: fpu avx2 fma\n")
    assert not cpu_has_native_bf16(avx2)
    bf16.write_text("processor: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_has_native_bf16(bf16)
    assert not cpu_has_native_bf16(tmp_path / "absent")
