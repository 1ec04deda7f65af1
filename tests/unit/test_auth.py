"""Tokens file parsing, role checks, permits, adapter path confinement, pickle refusal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.server.auth import ROLE_OF, Authenticator, TokenFileError, bearer, load_tokens
from tiller.server.errors import LimitExceeded, PermissionDenied, Unauthenticated
from tiller.server.formats.manifest import ManifestError, check_inside, load_manifest

SECRET = "s3cret-value-0123456789"


def _file(tmp_path: Path, text: str, name: str = "tokens.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_toml_and_json_give_the_same_grants(tmp_path: Path) -> None:
    sha = hashlib.sha256(SECRET.encode()).hexdigest()
    toml = _file(
        tmp_path,
        f'[[tokens]]\nname = "app"\nsha256 = "{sha}"\nroles = ["generate"]\nmax_concurrent = 3\n',
    )
    js = _file(
        tmp_path,
        json.dumps({"tokens": [{"name": "app", "token": SECRET, "roles": ["generate"],
                                "max_concurrent": 3}]}),
        "tokens.json",
    )  # fmt: skip
    assert load_tokens(toml) == load_tokens(js)
    (grant,) = load_tokens(toml)
    assert grant.sha256 == sha and grant.roles == {"generate"} and grant.max_concurrent == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty 'tokens' list"),
        ('[[tokens]]\nname = "a"\nroles = ["generate"]\n', "exactly one of sha256 or token"),
        ('[[tokens]]\nname = "a"\ntoken = "short"\nroles = ["generate"]\n', "16 characters"),
        ('[[tokens]]\nname = "a"\nsha256 = "xyz"\nroles = ["generate"]\n', "64 hex"),
        (f'[[tokens]]\nname = "a"\ntoken = "{SECRET}"\nroles = ["root"]\n', "roles must be"),
        (f'[[tokens]]\nname = "a"\ntoken = "{SECRET}"\nroles = []\n', "roles must be"),
        (f'[[tokens]]\nname = "a"\ntoken = "{SECRET}"\nrole = ["admin"]\n', "unknown keys: role"),
        (
            f'[[tokens]]\nname = "a"\ntoken = "{SECRET}"\nroles = ["admin"]\nmax_concurrent = -1\n',
            "max_concurrent",
        ),
        (
            f'[[tokens]]\nname = "a"\ntoken = "{SECRET}"\nroles = ["admin"]\n'
            f'[[tokens]]\nname = "b"\ntoken = "{SECRET}"\nroles = ["generate"]\n',
            "duplicate token",
        ),
        ("not toml ][", "tokens file"),
    ],
)
def test_bad_token_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message) as info:
        load_tokens(_file(tmp_path, text))
    assert SECRET not in str(info.value)


def test_every_rpc_in_the_api_has_a_role() -> None:
    methods = {
        f"/{service.full_name}/{m.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert methods == {m for m in ROLE_OF if m.startswith("/tiller.v1.")}


def test_http_routes_need_the_role_of_the_rpc_they_translate() -> None:
    rpc = "/tiller.v1.Tiller/"
    assert (
        ROLE_OF["/v1/completions"] == ROLE_OF["/v1/chat/completions"] == ROLE_OF[rpc + "Generate"]
    )
    assert ROLE_OF["/v1/feedback"] == ROLE_OF[rpc + "SubmitFeedback"]
    assert ROLE_OF["/v1/models"] == ROLE_OF[rpc + "ListAdapters"]


def test_bearer_header_parsing() -> None:
    assert bearer([("authorization", f"Bearer {SECRET}")]) == SECRET
    assert bearer([("Authorization", f"bearer  {SECRET} ")]) == SECRET
    assert bearer([("authorization", f"Basic {SECRET}")]) is None
    assert bearer([("authorization", "Bearer ")]) is None
    assert bearer([("x-other", "1")]) is None
    assert bearer(None) is None


def test_roles_and_permits(tmp_path: Path) -> None:
    grants = load_tokens(
        _file(
            tmp_path,
            f'[[tokens]]\nname = "app"\ntoken = "{SECRET}"\nroles = ["generate"]\n'
            "max_concurrent = 2\n"
            f'[[tokens]]\nname = "ops"\ntoken = "{SECRET}-ops"\nroles = ["admin"]\n',
        )
    )
    auth = Authenticator(grants)
    gen, adm = "/tiller.v1.Tiller/Generate", "/tiller.v1.TillerAdmin/LoadAdapter"
    with pytest.raises(Unauthenticated):
        auth.authorize(gen, None)
    with pytest.raises(Unauthenticated) as info:
        auth.authorize(gen, "guess")
    assert "guess" not in info.value.message
    app = auth.authorize(gen, SECRET)
    assert auth.authorize("/tiller.v1.Tiller/ListAdapters", SECRET) == app
    with pytest.raises(PermissionDenied, match="lacks role 'admin'"):
        auth.authorize(adm, SECRET)
    with pytest.raises(PermissionDenied, match="lacks role 'generate'"):
        auth.authorize(gen, f"{SECRET}-ops")
    with pytest.raises(PermissionDenied):  # an RPC the table does not know needs admin
        auth.authorize("/tiller.v1.Tiller/Unknown", SECRET)
    auth.acquire(app)
    auth.acquire(app)
    with pytest.raises(LimitExceeded, match="'app' has 2 requests in flight"):
        auth.acquire(app)
    auth.release(app)
    auth.acquire(app)
    ops = auth.authorize(adm, f"{SECRET}-ops")
    for _ in range(100):  # max_concurrent 0: no cap
        auth.acquire(ops)
    assert auth.in_flight("app") == 2 and auth.in_flight("ops") == 100


def test_adapter_paths_are_confined_to_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    (root / "detox" / "v0001").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    assert check_inside(root / "detox" / "v0001", (root,)) == (root / "detox/v0001").resolve()
    for bad in (root / ".." / "elsewhere", root / "escape", Path("/etc")):
        with pytest.raises(PermissionDenied, match="outside the adapter roots"):
            check_inside(bad, (root,))


def test_a_version_with_pickled_weights_is_refused(tmp_path: Path) -> None:
    from tiller.server.formats.manifest import Manifest, write_manifest

    d = tmp_path / "v0001"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    write_manifest(d, Manifest(name="x", version=1, base_model="m", has_lora=True))
    load_manifest(d)
    (d / "adapter_model.bin").write_bytes(b"pickle")  # not listed in the manifest, still refused
    with pytest.raises(ManifestError, match=r"pickled weights \(adapter_model.bin\)"):
        load_manifest(d)
