"""`tiller align` end to end on the tiny model, and its process supervision (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tiller.learner.align.config import load_config, parse_config
from tiller.learner.align.supervisor import ChildFailed, ChildSpec, Supervisor
from tiller.server.formats.manifest import load_manifest
from tiller.server.formats.registry import version_path

QUICK = """
name = "quick"
model = "{model}"
duration_s = 300
reward_provider = "len"
[server]
args = ["--dtype", "float32", "--max-model-len", "512"]
[annotator]
batch_size = 64
[[annotator.providers]]
name = "len"
type = "score"
scorer = "length"
[learner]
adapter = "critic"
base_model = "tiny-llama"
max_iterations = 2
[learner.trigger]
min_annotations = 8
min_examples = 2
poll_s = 0.2
[learner.sample]
prompts_file = "prompts.txt"
per_iteration = 6
n = 2
# room for the two samples' word counts to differ after DPO lengthened them (ties are dropped)
max_tokens = 16
[learner.data]
kind = "pairs"
source = "score"
provider = "len"
[learner.train]
objective = "dpo"
lora_r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
batch_size = 4
max_steps = 2
max_length = 64
[learner.gate]
prompts = ["x y", "z w"]
scorer = "length"
margin = 1000.0
[learner.gate.sampling]
max_tokens = 8
[eval]
prompts = ["x y", "z w", "q r"]
scorer = "length"
[eval.sampling]
max_tokens = 8
seed = 4321
"""


def _alive_with(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (the run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(int(entry.name))
    return found


def _align_argv(tmp_path: Path, template: str, model: Path, name: str, run_dir: str) -> list[str]:
    """Write the prompt pool and ``<name>.toml`` (``template`` on ``model``) into ``tmp_path``;
    the ``tiller align`` command line for them."""
    (tmp_path / "prompts.txt").write_text("\n".join(f"p{i} q{i}" for i in range(6)) + "\n")
    config = tmp_path / f"{name}.toml"
    config.write_text(template.format(model=model))
    return [sys.executable, "-m", "tiller.client.cli", "align", "--config", str(config),
            "--run-dir", run_dir]  # fmt: skip


def _align(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to the end; it must exit 0."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_align_runs_the_loop_and_leaves_a_report(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A relative run directory (from another cwd): every child must see the same files.
    proc = _align(_align_argv(tmp_path, QUICK, tiny_model, "quick", "run"), cwd=tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ended"] == "learner finished its iterations"
    assert [(i["status"], i["version"]) for i in report["iterations"]] == [
        ("promoted", 1),
        ("promoted", 2),
    ]
    assert report["promoted_version"] == 2
    labels = [c["label"] for c in report["eval"]["conditions"]]
    assert labels == ["base", "critic@v2"]
    assert all(c["n"] == 6 and c["perplexity"] > 1 for c in report["eval"]["conditions"])
    for png in ("heldout_eval", "reward_by_version", "heldout_vs_time"):
        assert (run_dir / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("server", "annotator", "learner"):
        assert (run_dir / "logs" / f"{name}.log").exists()
    assert "stopped server (exit 0)" in proc.stderr
    assert _alive_with(str(run_dir)) == []  # no orphans


SAMPLED = QUICK.replace('name = "quick"', 'name = "sampled"').replace(
    "[annotator]\n",
    '[sampler]\nargs = ["--dtype", "float32", "--max-model-len", "512"]\n[annotator]\n',
)


def test_align_sends_the_loops_generations_to_its_sampler_replica(
    tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = _align(_align_argv(tmp_path, SAMPLED, tiny_model, "sampled", str(run_dir)))
    report = json.loads((run_dir / "report.json").read_text())
    assert [(i["status"], i["version"]) for i in report["iterations"]] == [
        ("promoted", 1),
        ("promoted", 2),
    ]
    sampler_port = (run_dir / "sampler.port").read_text().strip()
    assert sampler_port != (run_dir / "server.port").read_text().strip()
    learner = json.loads((run_dir / "learner.json").read_text())
    assert learner["server"] == f"127.0.0.1:{sampler_port}"
    server_log = (run_dir / "logs" / "server.log").read_text()
    sampler_log = (run_dir / "logs" / "sampler.log").read_text()
    # The gate's candidates load on the replica only; both serve every promoted version.
    assert "loaded critic-candidate v1" in sampler_log
    assert "critic-candidate" not in server_log
    for log in (server_log, sampler_log):
        assert "hot-swapped critic to v2" in log
    # The learner's samples (logged by the replica into the run's one log) were trained on.
    assert report["iterations"][0]["examples"] > 0
    assert "stopped sampler (exit 0)" in proc.stderr
    assert _alive_with(str(run_dir)) == []


JUDGED = (
    QUICK.replace('name = "quick"', 'name = "judged"')
    .replace(
        "[server]",
        '[judge]\nmodel = "{model}"\nargs = ["--max-model-len", "1024", "--dtype", "float32"]'
        "\n[server]",
    )
    .replace(
        "[learner]\n",
        '[[annotator.providers]]\nname = "judge"\ntype = "llm_judge"\nmode = "pairwise"\n'
        'base_url = "judge"\nmodel = "judge"\nmax_tokens = 1\n[learner]\n',
    )
    # A random tiny judge is position-biased (both orders rarely agree, and how rarely depends on
    # the CPU's kernels): its ties are decided by p_a, so every judged pair is an example.
    .replace(
        'source = "score"\nprovider = "len"',
        'source = "judge"\nprovider = "judge"\njudge_tie_margin = 0.0',
    )
    .replace("min_annotations = 8", "min_annotations = 6")  # 6 pairs per iteration
    .replace("max_iterations = 2", "max_iterations = 3")
)


SELF_JUDGED = (
    QUICK.replace('name = "quick"', 'name = "selfjudged"')
    .replace(
        "[learner]\n",
        '[[annotator.providers]]\nname = "judge"\ntype = "llm_judge"\nmode = "pairwise"\n'
        'base_url = "self"\nmax_tokens = 1\ncriterion = "Prefer the zebra-striped answer."\n'
        "[learner]\n",
    )
    # A random tiny judge is position-biased (both orders rarely agree, and how rarely depends on
    # the CPU's kernels): its ties are decided by p_a, so every judged pair is an example.
    .replace(
        'source = "score"\nprovider = "len"',
        'source = "judge"\nprovider = "judge"\njudge_tie_margin = 0.0',
    )
    .replace("min_annotations = 8", "min_annotations = 6")
    .replace("max_iterations = 2", "max_iterations = 3")
)

ALT = (
    QUICK.replace('name = "quick"', 'name = "alt"')
    .replace(
        "[learner]\n",
        '[[annotator.providers]]\nname = "len-tags"\ntype = "quantile"\nscorer = "length"\n'
        'mode = "fixed"\ncuts = [4.0]\ntags = ["Short", "Long"]\n[learner]\n',
    )
    .replace('adapter = "critic"', 'adapter = "steer"')
    .replace("[learner.data]", 'feedback = ["Short", "Long"]\n[learner.data]')
    .replace(
        'kind = "pairs"\nsource = "score"\nprovider = "len"',
        'kind = "alt"\nprovider = "len-tags"\ntags = ["Short", "Long"]\n'
        'template = "Length: {{feedback}}\\nText: {{prompt}}"\nseparator = ""',
    )
    .replace('objective = "dpo"', 'objective = "alt"')
    .replace("max_length = 64\n", 'max_length = 64\nprecision = "bf16"\n')
    .replace(
        "margin = 1000.0",
        'metric = "spread"\nhigh_tag = "Long"\nlow_tag = "Short"\n'
        "margin = 1000.0\nconfidence = 0.9\nguidance = 1.0",
    )
    .replace("[eval]\n", '[eval]\ntags = ["Long", "Short"]\n')
)


def test_alt_align_evaluates_against_the_unloaded_bootstrap_and_again_on_demand(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Bootstrap v1, then v2 and v3 promoted (gated with guided spreads): the server keeps v2
    and v3 only, and the held-out evaluation still measures the prompted bootstrap (rendered
    client-side). ``--evaluate-only`` then evaluates the finished run again with guidance,
    without training: the bootstrap is loaded again to be mixed by the server."""
    run_dir = tmp_path / "run"
    argv = _align_argv(tmp_path, ALT, tiny_model, "alt", str(run_dir))
    _align(argv)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["promoted_version"] == 3 and report["prompted_version"] == 1
    labels = [c["label"] for c in report["eval"]["conditions"]]
    assert labels == [
        "base", "steer@v3 [Long]", "steer@v3 [Short]",
        "prompted steer@v1 [Long]", "prompted steer@v1 [Short]",
    ]  # fmt: skip
    assert "tag spread, trained over prompted" in report["eval"]
    iterations = report["iterations"]
    gates = [i for i in iterations if i["status"] == "promoted"]
    assert len(gates) == 2 and all(i["candidate_value"] is not None for i in gates)
    config = Path(argv[argv.index("--config") + 1])
    config.write_text(config.read_text().replace("[eval]\n", "[eval]\nguidance = 1.0\n"))
    again = subprocess.run([*argv, "--evaluate-only"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    second = json.loads((run_dir / "report.json").read_text())
    assert second["ended"] == "evaluate only" and second["iterations"] == iterations
    assert [c["label"] for c in second["eval"]["conditions"]] == [
        "base", "steer@v3 [Long, guided w=1]", "steer@v3 [Short, guided w=1]",
        "prompted steer@v1 [Long, guided w=1]", "prompted steer@v1 [Short, guided w=1]",
    ]  # fmt: skip
    assert [c["n"] for c in second["eval"]["conditions"]] == [6] * 5  # 3 prompts x 2 samples
    assert "tag spread, trained over prompted" in second["eval"]
    assert "started learner" not in again.stderr and _alive_with(str(run_dir)) == []


LONG = "{{long = 1.0, plain = 0.0}}"
CMPO = (
    QUICK.replace('name = "quick"', 'name = "plural"')
    .replace(
        "[learner]\n",
        '[[annotator.providers]]\nname = "ratings"\ntype = "rating"\n'
        '[[annotator.providers.attributes]]\nname = "long"\nscorer = "length"\n'
        "cuts = [2.0, 4.0, 6.0]\n"
        '[[annotator.providers.attributes]]\nname = "plain"\nscorer = "readability"\n'
        "cuts = [0.0, 50.0]\n[learner]\n",
    )
    .replace('adapter = "critic"', 'adapter = "plural"')
    .replace(
        "n = 2\n",
        "n = 3\nattributes = [{{long = 1.0, plain = 0.0}}, {{long = 0.0, plain = 1.0}}]\n",
    )
    .replace(
        'kind = "pairs"\nsource = "score"\nprovider = "len"',
        'kind = "cmpo"\nprovider = "ratings"\nattributes = ["long", "plain"]',
    )
    .replace(
        '[learner.train]\nobjective = "dpo"\nlora_r = 4\nlora_alpha = 8\n'
        'target_modules = ["q_proj", "v_proj"]\nbatch_size = 4\nmax_steps = 2\n',
        "[learner.heads]\nrank = 2\nepochs = 1\nbatch_size = 16\n",
    )
    .replace(
        "margin = 1000.0",
        "margin = 1000.0\nattributes = {{long = 1.0, plain = 0.0}}\n"
        '[[learner.gate.heads]]\nattributes = {{long = 0.0, plain = 1.0}}\nscorer = "readability"',
    )
    .replace(
        'scorer = "length"\n[eval.sampling]\n',
        'scorer = "length"\nattributes = {{long = 1.0, plain = 0.0}}\n'
        '[eval.sweep]\nattributes = ["long", "plain"]\nscorers = ["length", "readability"]\n'
        "lambdas = [0.0, 1.0]\n[eval.sampling]\n",
    )
)


def test_cmpo_align_trains_heads_and_sweeps_the_weights(tiny_model: Path, tmp_path: Path) -> None:
    """The multi-head mode: rating annotations -> CMPO pairs -> plural heads -> gate at the
    configured weights -> promoted; the evaluation at those weights and the weight sweep."""
    run_dir = tmp_path / "run"
    _align(_align_argv(tmp_path, CMPO, tiny_model, "plural", str(run_dir)))
    report = json.loads((run_dir / "report.json").read_text())
    assert [(i["status"], i["version"]) for i in report["iterations"]] == [
        ("promoted", 1),
        ("promoted", 2),
    ]
    labels = [c["label"] for c in report["eval"]["conditions"]]
    assert labels == ["base", "plural@v2 {long=1, plain=0}"]
    points = report["sweep"]["points"]
    assert [p["label"] for p in points] == ["base", "λ=0", "λ=1"]
    assert points[2]["weights"] == {"long": 1.0, "plain": 0.0}
    assert all(set(p["means"]) == {"length", "readability"} and p["n"] == 6 for p in points)
    heads = report["sweep"]["heads"]
    assert [(h["attribute"], h["scorer"], h["lambda"]) for h in heads] == [
        ("long", "length", 1.0),
        ("plain", "readability", 0.0),
    ]
    assert all(isinstance(h["monotone"], bool) and "gain" in h and "p" in h for h in heads)
    assert all(
        isinstance(h["monotone_within_noise"], bool)
        and isinstance(h["trend_p"], float)
        and isinstance(h["reversals"], list)
        for h in heads
    )
    assert (run_dir / "plots" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the gate checked the second head too, on its own scorer, for both sides
    for v in (1, 2):
        gate = load_manifest(version_path(run_dir / "registry", "plural", v)).extra["metrics"]
        (head,) = gate["gate"]["heads"]
        assert head["attributes"] == {"long": 0.0, "plain": 1.0}
        assert head["scorer"] == "readability"
        assert isinstance(head["candidate"], float) and isinstance(head["incumbent"], float)
    assert _alive_with(str(run_dir)) == []


def test_align_with_a_real_llm_judge(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM's OpenAI server on the tiny model judges the pairs (both orders); the learner trains
    DPO on its verdicts: the LLM-judge path end to end."""
    proc = _align(_align_argv(tmp_path, JUDGED, tiny_model, "judged", str(tmp_path / "run")))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "promoted" in [i["status"] for i in report["iterations"]]
    learner = json.loads((tmp_path / "run" / "learner.json").read_text())
    assert learner["data"]["source"] == "judge"
    from tiller.server.formats.logstore import connect

    db = connect(tmp_path / "run" / "log.sqlite")
    verdicts = db.execute(
        "SELECT count(*) FROM annotations WHERE provider = 'judge' AND error = ''"
    ).fetchone()[0]
    assert verdicts >= 2  # pairwise verdicts from the live judge fed the iteration
    assert "stopped judge" in proc.stderr
    assert _alive_with(str(tmp_path / "run")) == []


def test_align_judges_with_the_served_model_itself(tiny_model: Path, tmp_path: Path) -> None:
    """base_url = "self": the annotator judges over the run server's own HTTP API (its base
    model, log = false, vLLM's structured outputs); no second vLLM process."""
    run = tmp_path / "run"
    proc = _align(_align_argv(tmp_path, SELF_JUDGED, tiny_model, "selfjudged", str(run)))
    report = json.loads((run / "report.json").read_text())
    assert "promoted" in [i["status"] for i in report["iterations"]]
    judged = report["judges"]["judge"]
    assert judged["verdicts"] >= 2 and 0.0 <= judged["order_consistency"] <= 1.0
    assert "len" in judged["scorer_agreement"]
    assert (run / "plots" / "judges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    annotator = json.loads((run / "annotator.json").read_text())
    judge = next(p for p in annotator["providers"] if p["name"] == "judge")
    http_port = (run / "server.http_port").read_text().strip()
    assert judge["base_url"] == f"http://127.0.0.1:{http_port}/v1"
    assert judge["model"] == tiny_model.name and judge["extra_body"] == {"log": False}
    from tiller.server.formats.logstore import connect

    db = connect(run / "log.sqlite")
    verdicts = db.execute(
        "SELECT count(*) FROM annotations WHERE provider = 'judge' AND error = ''"
    ).fetchone()[0]
    assert verdicts >= 2
    judged_prompts = db.execute(
        "SELECT count(*) FROM generations WHERE rendered_prompt LIKE '%zebra-striped%'"
    ).fetchone()[0]
    assert judged_prompts == 0, "the judge's own requests must stay out of the log"
    log = (run / "logs" / "annotator.log").read_text()
    assert "switching to plain prompting" not in log, log[-3000:]  # structured outputs held
    assert "stopped judge" not in proc.stderr  # there is no judge process
    assert _alive_with(str(run)) == []


def test_align_config_is_checked_before_anything_starts(tmp_path: Path) -> None:
    sweep = {"attributes": ["a"], "scorers": ["length"]}
    data = {
        "name": "x",
        "annotator": {"providers": [{"name": "len", "type": "score", "scorer": "length"}]},
        "learner": {
            "adapter": "a",
            "base_model": "b",
            "data": {"kind": "pairs", "source": "score", "provider": "len"},
            "sample": {"prompts": ["p"]},
        },
    }
    assert parse_config(data, tmp_path).mode == "active"
    bad_cases = [
        ({**data, "mode": "passive"}, "passive"),
        ({**data, "learner": {**data["learner"], "train": {"objective": "nope"}}}, "nope"),
        ({**data, "bogus": 1}, "bogus"),
        ({**data, "eval": {"prompts": ["p"], "scorer": "length", "tags": ["a"]}}, "two extreme"),
        (
            {
                **data,
                "eval": {"prompts": ["p"], "scorer": "length", "sweep": sweep},
            },
            r"\[eval.sweep\]",
        ),
    ]
    for bad, needle in bad_cases:
        with pytest.raises(ValueError, match=needle):
            parse_config(bad, tmp_path)


SHIPPED = sorted((Path(__file__).parents[2] / "deploy" / "align").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_align_configs_load(path: Path) -> None:
    cfg = load_config(path)
    # 20 minutes at most, ALT's one large iteration 45 (docs/results/alt.md)
    longest = 2700 if path.stem == "alt-sentiment" else 1200
    assert cfg.name == path.stem and cfg.model == "smollm2" and cfg.duration_s <= longest


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_supervisor_restarts_a_crashing_child_then_gives_up(tmp_path: Path) -> None:
    sup = Supervisor(report=lambda _: None)
    sup.start(
        ChildSpec("crasher", _py("import sys; sys.exit(3)"), tmp_path / "c.log", max_restarts=2)
    )
    deadline = time.monotonic() + 30
    with pytest.raises(ChildFailed, match="crasher exited with 3 after 2 restarts"):
        while time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.05)
    assert sup.children[0].exits == [3, 3, 3]
    sup.stop_all()


def test_supervisor_stops_grandchildren_and_children_die_with_it(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")
    # A child that spawns a grandchild (like the server's engine process) and ignores nothing.
    child = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
        time.sleep(600)
    """
    sup = Supervisor(report=lambda _: None)
    sup.start(ChildSpec("tree", [*_py(child), marker], tmp_path / "t.log", stop_grace_s=5))
    deadline = time.monotonic() + 20
    while len(_alive_with(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_alive_with(marker)) == 2
    sup.stop_all()
    deadline = time.monotonic() + 10  # SIGKILL to the group is delivered asynchronously
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_with(marker) == []

    # kill -9 of the supervisor: the kernel's parent-death signal stops its children.
    parent = f"""
        import sys, time
        from pathlib import Path
        from tiller.learner.align.supervisor import ChildSpec, Supervisor
        sup = Supervisor(report=lambda _: None)
        sup.start(ChildSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(600)",
                                        "{marker}"], Path("{tmp_path}") / "s.log"))
        print("up", flush=True)
        time.sleep(600)
    """
    p = subprocess.Popen(_py(parent), stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    assert len([pid for pid in _alive_with(marker) if pid != p.pid]) == 1  # the sleeper
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive_with(marker) == []
