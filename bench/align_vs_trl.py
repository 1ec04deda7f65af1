"""Tiller's online loop vs TRL's online DPO trainer, same model, prompts, reward and budget (#8).

The "critical reviewer" task on SmolLM2-135M-Instruct (CPU): continue movie-review
openings (``deploy/align/prompts/reviews-train.txt``); reward = -VADER compound of the
continuation (more critical is better). Both sides: the training settings of
``oaif-critic.toml`` (LoRA r=16 alpha=32 on q,k,v,o_proj, bf16 autocast where the CPU has
native bf16, else float32 (``precision = "fast"``),
DPO beta 0.1, lr 5e-4, batch 8), 48 new tokens, temperature 1.0, repetition penalty 1.2.
One trained pair per prompt: TRL samples 2 continuations; Tiller samples 4 (the config's
``sample.n``: vLLM samples them at little extra cost) and pairs the best with the worst.

1. Serving baseline: a plain ``tiller serve`` on the same model, 4 closed-loop users
   (``user_load.UserLoad``: 32 tokens with ``ignore_eos``, ``log=False``) for ``--baseline-s``:
   completed tokens/s and request latencies.
2. Tiller: ``tiller align --config deploy/align/oaif-critic.toml`` (server + annotator +
   learner); the budget starts when its server is up (``server.port``), the same client load runs
   throughout, and SIGINT at the end of the budget stops the loop (the iteration in flight may
   finish; ``tiller align`` then runs its own evaluation and exits). Samples/s = trained pairs
   (sum over iterations of ``examples x epochs``) over the loop's wall time, from ``server.port``
   to the later of the budget's end and the last iteration's end.
3. TRL: ``bench/trl_online_dpo.py`` in a process of its own, stopped at the first step end after
   the budget. Samples/s = prompts with a generated pair (steps x batch) over training time.
   TRL trains with Tiller's settings from the same config (``trl_settings``: LoRA rank, alpha,
   modules and layers, lr, beta, batch size, bf16 autocast).
4. TRL beside the same serving load (``--skip-trl-loaded`` leaves it out): step 3 while a plain
   ``tiller serve`` of the same model answers the client load of step 1 on the same 2 cores, so
   both learners share the CPU with the same serving work. The issue's comparison is step 3
   (TRL alone); this one separates what Tiller's loop costs from what serving costs.
5. Held-out evaluation, the same for base, Tiller's promoted adapter and both TRL adapters:
   transformers + peft, the 64 held-out openings, 2 samples each with fixed seeds: mean reward
   with a 95% t-interval, distinct-2.

Two rates for Tiller: over the budget (the partial iteration at its end counts as time but not as
pairs) and over its finished iterations only (pairs over the time to the last one's end), the
same unit as TRL's rate, which stops at a step end.

Writes ``bench/out/align_vs_trl.json`` and ``.png``; the runs themselves go to
``bench/out/align_vs_trl-work/``. Both sides share 2 CPU cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils
from user_load import TRAINED, UserLoad, pairs_lines, report, user_lines

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "align" / "oaif-critic.toml"
TRAIN = ROOT / "deploy" / "align" / "prompts" / "reviews-train.txt"
HELDOUT = ROOT / "deploy" / "align" / "prompts" / "reviews-heldout.txt"
LOAD_CONCURRENCY = 4
LOAD_TOKENS = 32
# Both sides' processes (and their children) get this environment. Passive OpenMP waits: on a
# shared, oversubscribed CPU, one process's spinning OpenMP barriers starve the others.
ENV = {
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    # vLLM-CPU sizes its KV cache from free memory at start, which over-commits beside other
    # engines; 1 GiB (~46k SmolLM2 tokens) is ample for this load.
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "PYTHONUNBUFFERED": "1",
}
ITERATION_KEYS = ("iteration", "status", "examples", "steps", "samples_per_s",
                  "candidate_value", "incumbent_value", "started_at", "finished_at")  # fmt: skip


# --------------------------------------------------------------------------- serving load


class Load(UserLoad):
    """``LOAD_CONCURRENCY`` closed-loop Generate streams (``log=False``) on the held-out prompts,
    ``LOAD_TOKENS`` tokens each (``ignore_eos``: every request generates that many)."""

    def __init__(self, target: str) -> None:
        super().__init__(
            target,
            lines(HELDOUT),
            LOAD_CONCURRENCY,
            max_tokens=LOAD_TOKENS,
            temperature=1.0,
            ignore_eos=True,
            log=False,
        )


def lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def wait_port(port_file: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{proc.args!r}: no port (rc={proc.poll()}):\n{tail}")
        time.sleep(0.5)
    return f"127.0.0.1:{port_file.read_text().strip()}"


def wait_serving(target: str, timeout: float) -> None:
    from tiller.client import Client

    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client(target, timeout=120) as c:
                c.generate("Hello", max_tokens=4, log=False)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 120) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def loaded_server(model: Path, work: Path) -> Iterator[Load]:
    """A plain ``tiller serve`` of ``model`` answering the client load (started) until exit."""
    work.mkdir(parents=True, exist_ok=True)
    port_file, log = work / "server.port", work / "server.log"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tiller.client.cli", "serve", "--model", str(model),
           "--port", "0", "--port-file", str(port_file), "--no-log"]  # fmt: skip
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | ENV
        )
    try:
        target = wait_port(port_file, proc, log, 600)
        wait_serving(target, 120)
        load = Load(target)
        load.start()
        try:
            yield load
        finally:
            load.stop()
    finally:
        stop(proc)


def serving_baseline(model: Path, work: Path, seconds: float) -> dict[str, Any]:
    """A plain ``tiller serve`` of ``model`` under the client load for ``seconds``."""
    with loaded_server(model, work) as load:
        t0 = time.time()
        time.sleep(seconds)
        return load.window(t0, time.time())


# --------------------------------------------------------------------------- the two sides


def trl_settings(config: Path) -> list[str]:
    """``trl_online_dpo.py`` arguments carrying Tiller's training settings (LoRA shape and
    layers, lr, DPO beta, bf16 autocast, batch size) from its align config: both sides train
    the same adapter the same way, only the loops around the trainer differ. Keys the config
    leaves out take ``TrainConfig``'s and ``DPOConfig``'s defaults, as Tiller's learner does."""
    from dataclasses import fields

    from tiller.learner.objectives.dpo import DPOConfig
    from tiller.learner.trainer import TrainConfig

    raw = tomllib.loads(config.read_text())["learner"]["train"]
    t = {f.name: f.default for f in fields(TrainConfig)} | raw
    beta = raw.get("objective_config", {}).get("beta", DPOConfig().beta)
    args = ["--lr", str(t["lr"]), "--beta", str(beta), "--lora-r", str(t["lora_r"]),
            "--lora-alpha", str(t["lora_alpha"]), "--targets", ",".join(t["target_modules"]),
            "--batch-size", str(t["batch_size"])]  # fmt: skip
    if t["layers_to_transform"]:
        args += ["--layers", ",".join(str(i) for i in t["layers_to_transform"])]
    import torch

    from tiller.learner.trainer import bf16_autocast

    if bf16_autocast(TrainConfig(precision=t["precision"]), torch.device("cpu")):
        args.append("--bf16")
    return args


def run_trl_loaded(model: Path, budget_s: float, work: Path) -> dict[str, Any]:
    """``run_trl`` while a plain server answers the client load; ``serving``: its tok/s while
    TRL trained (``train_window``; not during its model load, when the server ran alone)."""
    with loaded_server(model, work / "server") as load:
        out = run_trl(model, budget_s, work)
        began, ended = out["train_window"]
        out["serving"] = load.window(began, ended)
    return out


def run_trl(model: Path, budget_s: float, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "trl_online_dpo.py"), "--model", str(model),
           "--prompts", str(TRAIN), "--budget-s", str(budget_s), "--out", str(work),
           *trl_settings(CONFIG)]  # fmt: skip
    env = os.environ | ENV
    began = time.time()
    with (work / "trl.log").open("wb") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    out: dict[str, Any] = json.loads((work / "trl.json").read_text())
    out["process_wall_s"] = time.time() - began
    return out


def run_tiller(model: Path, budget_s: float, work: Path) -> dict[str, Any]:
    """``tiller align`` with the client load on its server; see the module docstring."""
    run_dir = work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    log = work / "align.log"
    work.mkdir(parents=True, exist_ok=True)
    # --duration is only a backstop: SIGINT ends the loop ``budget_s`` after the server is up.
    cmd = [sys.executable, "-m", "tiller.client.cli", "align", "--config", str(CONFIG),
           "--run-dir", str(run_dir), "--duration", str(budget_s + 900)]  # fmt: skip
    began = time.time()
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | ENV
        )
    try:
        target = wait_port(run_dir / "server.port", proc, log, 900)
        ready = time.time()
        load = Load(target)
        load.start()
        while time.time() < ready + budget_s and proc.poll() is None:
            time.sleep(1.0)
        end = time.time()
        os.kill(proc.pid, signal.SIGINT)  # the align process only: it stops its children
        load.stop()
        serving = load.window(ready, end)
        proc.wait(timeout=1800)
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"tiller align exited {proc.returncode}; see {log}")
    return tiller_figures(run_dir, ready, end, budget_s) | {
        "serving": serving,
        "startup_s": ready - began,
        "run_dir": str(run_dir),
    }


def tiller_figures(run_dir: Path, ready: float, end: float, budget_s: float) -> dict[str, Any]:
    cfg = tomllib.loads(CONFIG.read_text())
    epochs = int(cfg["learner"]["train"].get("epochs", 1))
    adapter = cfg["learner"]["adapter"]
    from tiller.server.formats.logstore import generation_span, iterations

    db = sqlite_utils.Database(run_dir / "log.sqlite")
    rows = sorted(iterations(db), key=lambda r: r["iteration"])
    trained = [r for r in rows if r["status"] in TRAINED]
    pairs = sum(int(r["examples"]) * epochs for r in trained)
    last_end = max((float(r["finished_at"]) for r in rows), default=end)
    wall = max(end, last_end) - ready
    done_by = max((float(r["finished_at"]) for r in trained), default=0.0)
    gens = generation_span(db)
    db.close()
    n_gen, n_groups = gens.count, gens.groups
    state_file = run_dir / "registry" / adapter / "state.json"  # absent until a publish
    active = json.loads(state_file.read_text()).get("active") if state_file.exists() else None
    report = run_dir / "report.json"
    return {
        "adapter_dir": str(run_dir / "registry" / adapter / f"v{active:04d}") if active else None,
        "active_version": active,
        "iterations": [{k: r[k] for k in ITERATION_KEYS} for r in rows],
        "budget_s": budget_s,
        "wall_s": wall,
        "trained_pairs": pairs,
        "epochs": epochs,
        "samples_per_s": pairs / wall if wall > 0 else 0.0,
        # The TRL side's unit: finished work over the time to finish it (no partial tail).
        "finished_span_s": done_by - ready if trained else 0.0,
        "finished_samples_per_s": pairs / (done_by - ready) if trained else 0.0,
        "generations": n_gen,
        "sampled_prompts": n_groups,
        "generations_per_s": n_gen / wall if wall > 0 else 0.0,
        "sampled_prompts_per_s": n_groups / wall if wall > 0 else 0.0,
        "generations_span_s": (gens.last_at or 0.0) - (gens.first_at or 0.0) if n_gen else 0.0,
        "align_report": json.loads(report.read_text()).get("eval") if report.exists() else None,
    }


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model_dir: Path, adapter: Path | None, prompts: list[str], samples: int, seed: int = 1234
) -> dict[str, Any]:
    """Sample ``samples`` continuations of each prompt (seeded per sample round) and score them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiller.learner.align.evaluate import mean_ci
    from tiller.learner.annotate.scorers import make_scorer
    from tiller.learner.learn.gate import distinct_n

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    texts: list[str] = []
    with torch.inference_mode():
        for s in range(samples):
            torch.manual_seed(seed + s)
            for i in range(0, len(prompts), 32):
                enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    repetition_penalty=1.2,
                    max_new_tokens=48,
                    pad_token_id=tok.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                texts += tok.batch_decode(new, skip_special_tokens=True)
    scorer = make_scorer("sentiment")
    rewards = [-scorer.score(t) for t in texts]
    m, ci = mean_ci(rewards)
    return {
        "adapter": None if adapter is None else str(adapter),
        "n": len(rewards),
        "mean_reward": m,
        "ci95": ci,
        "distinct2": distinct_n(texts),
        "rewards": rewards,
        "examples": texts[:4],
    }


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def tiller_pairs(t: dict[str, Any]) -> dict[str, Any]:
    """Tiller's figures as ``user_load.pairs_lines`` takes them (over the budget's wall time)."""
    done = sum(i["status"] in TRAINED for i in t["iterations"])
    return {"pairs": t["trained_pairs"], "pairs_per_s": t["samples_per_s"],
            "iterations": done, "window_s": t["wall_s"]}  # fmt: skip


def trl_pairs(r: dict[str, Any]) -> dict[str, Any]:
    """A TRL run's figures as ``user_load.pairs_lines`` takes them (steps for iterations)."""
    return {"pairs": r["samples"], "pairs_per_s": r["samples_per_s"],
            "iterations": r["steps"], "window_s": r["wall_s"]}  # fmt: skip


def summarize(res: dict[str, Any]) -> list[str]:
    ev, out = res["eval"], []
    base = ev["base"]["mean_reward"]
    t, r = res.get("tiller"), res.get("trl")
    te, re_ = ev.get("tiller"), ev.get("trl")
    if te and re_:
        tm, rm = te["mean_reward"], re_["mean_reward"]
        # A ratio of two rewards only reads as "x times better" when both are positive.
        shown = f"{ratio(tm, rm):.2f}" if tm > 0 and rm > 0 else "n/a (a reward <= 0; see gains)"
        out.append(
            f"Tiller/TRL held-out reward ratio: {shown} (reward = -VADER; Tiller "
            f"{tm:+.3f} ± {te['ci95']:.3f}, TRL {rm:+.3f} ± {re_['ci95']:.3f}, "
            f"n={te['n']}, Welch p={res['tiller_vs_trl_p']:.2g})"
        )
        out.append(
            f"Tiller/TRL held-out reward gain ratio: {ratio(tm - base, rm - base):.2f} "
            f"(gain over base, Tiller vs TRL: {tm - base:+.3f} vs {rm - base:+.3f}; "
            f"base {base:+.3f} ± {ev['base']['ci95']:.3f})"
        )
    if t and r:
        out.append(
            f"Tiller/TRL samples/s ratio: {ratio(t['samples_per_s'], r['samples_per_s']):.2f} "
            f"(Tiller {t['samples_per_s']:.3f} trained pairs/s = examples x {t['epochs']} epochs "
            f"over {t['wall_s']:.0f} s; TRL {r['samples_per_s']:.3f} prompts with a trained pair"
            f"/s over {r['wall_s']:.0f} s)"
        )
        out.append(
            f"Tiller/TRL sampled pairs/s ratio: "
            f"{ratio(t['sampled_prompts_per_s'], r['samples_per_s']):.2f} (Tiller "
            f"{t['sampled_prompts_per_s']:.3f} prompts sampled x2 /s, "
            f"{t['generations_per_s']:.3f} generations/s; TRL {r['samples_per_s']:.3f})"
        )
    if t and r and t.get("finished_span_s"):
        out.append(
            f"Tiller/TRL samples/s ratio over finished iterations: "
            f"{ratio(t['finished_samples_per_s'], r['samples_per_s']):.2f} (Tiller "
            f"{t['finished_samples_per_s']:.3f} pairs/s over {t['finished_span_s']:.0f} s to its "
            f"last finished iteration; TRL {r['samples_per_s']:.3f} to its last step end)"
        )
    # The serving and pairs/s lines as bench/serving_during_learning.py prints them.
    load = f"{LOAD_CONCURRENCY} users, {LOAD_TOKENS} tokens each"
    tl, le = res.get("trl_loaded"), ev.get("trl_loaded")
    if t and res.get("baseline"):
        out += user_lines(res["baseline"], t["serving"], load)
    if tl and res.get("baseline"):
        out += user_lines(res["baseline"], tl["serving"], load, beside="TRL")
    if t:
        out += pairs_lines(tiller_pairs(t), None, load)
    if tl:
        alone = trl_pairs(r) if r else None
        out += pairs_lines(trl_pairs(tl), alone, load, learner="TRL", rounds="steps")
    if t and tl and te and le:
        lm = le["mean_reward"]
        out.append(
            f"beside the same serving load: Tiller/TRL held-out reward gain ratio "
            f"{ratio(te['mean_reward'] - base, lm - base):.2f} ({te['mean_reward'] - base:+.3f} "
            f"vs {lm - base:+.3f}, Welch p={res.get('tiller_vs_trl_loaded_p', float('nan')):.2g});"
            f" samples/s ratio {ratio(t['samples_per_s'], tl['samples_per_s']):.2f} (budget), "
            f"{ratio(t.get('finished_samples_per_s', 0.0), tl['samples_per_s']):.2f} (finished "
            f"iterations; TRL {tl['samples_per_s']:.3f} pairs/s in {tl['steps']} steps)"
        )
    d2 = ", ".join(f"{k} {v['distinct2']:.3f}" for k, v in ev.items())
    out.append(f"held-out distinct-2: {d2}")
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = res["eval"]
    colour = {"base": "grey", "tiller": "tab:blue", "trl": "tab:orange", "trl_loaded": "tab:red"}
    label = {"tiller": "Tiller\n(+serving)", "trl": "TRL\nalone", "trl_loaded": "TRL\n(+serving)"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(ev)
    axes[0].bar([label.get(k, k) for k in names], [ev[k]["mean_reward"] for k in names],
                yerr=[ev[k]["ci95"] for k in names], capsize=6,
                color=[colour[k] for k in names])  # fmt: skip
    axes[0].axhline(0, color="black", lw=0.5)
    axes[0].set_title("held-out reward (-VADER), 95% CI")
    bars: list[tuple[str, float, str]] = []
    if res.get("tiller"):
        t = res["tiller"]
        bars.append(("Tiller\nbudget", t["samples_per_s"], "tab:blue"))
        if t.get("finished_span_s"):
            bars.append(("Tiller\nfinished its.", t["finished_samples_per_s"], "tab:cyan"))
    for k in ("trl", "trl_loaded"):
        if res.get(k):
            bars.append((label.get(k, k), res[k]["samples_per_s"], colour[k]))
    axes[1].bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    axes[1].set_title("trained pairs/s")
    if res.get("baseline"):
        serving = [("idle", res["baseline"]["tok_per_s"], "grey")]
        for k in ("tiller", "trl_loaded"):
            if res.get(k) and res[k].get("serving"):
                serving.append(
                    (f"beside {label[k].split()[0]}", res[k]["serving"]["tok_per_s"], colour[k])
                )
        axes[2].bar([b[0] for b in serving], [b[1] for b in serving],
                    color=[b[2] for b in serving])  # fmt: skip
    axes[2].set_title(f"serving tok/s ({LOAD_CONCURRENCY} concurrent)")
    fig.suptitle(f"critical reviewer, SmolLM2-135M, CPU, budget {res['budget_s']:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 60 s budget, 16 eval prompts")
    p.add_argument("--skip-tiller", action="store_true")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-trl-loaded", action="store_true", help="no TRL beside serving")
    p.add_argument("--baseline-s", type=float, default=45.0)
    p.add_argument("--reuse", action="store_true", help="reuse finished sides from the work dir")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "align_vs_trl.json")
    a = p.parse_args()
    os.environ.update(ENV)  # before torch is imported, for the evaluation in this process
    budget = 60.0 if a.quick else a.budget_s
    baseline_s = 15.0 if a.quick else a.baseline_s
    prompts = lines(HELDOUT)[: 16 if a.quick else None]

    from tiller.server.tools.models import prepare_smollm2

    model = prepare_smollm2(Path.home() / ".cache" / "tiller")
    work = a.out.with_name(a.out.stem + "-work")
    res: dict[str, Any] = {"budget_s": budget, "quick": a.quick, "model": str(model)}

    def side(name: str, what: str, fn: Callable[[], dict[str, Any]]) -> None:
        saved = work / f"{name}.json"
        if a.reuse and saved.exists():
            res[name] = json.loads(saved.read_text())
            return
        print(f"{what} ...", flush=True)
        res[name] = fn()
        saved.write_text(json.dumps(res[name], indent=2, default=str))

    work.mkdir(parents=True, exist_ok=True)
    if not a.skip_tiller:
        side("baseline", f"serving baseline ({baseline_s:.0f} s)",
             lambda: serving_baseline(model, work / "baseline", baseline_s))  # fmt: skip
        side("tiller", f"tiller align ({budget:.0f} s budget)",
             lambda: run_tiller(model, budget, work / "tiller"))  # fmt: skip
    if not a.skip_trl:
        side("trl", f"TRL online DPO ({budget:.0f} s budget)",
             lambda: run_trl(model, budget, work / "trl"))  # fmt: skip
    if not a.skip_trl_loaded:
        side("trl_loaded", f"TRL online DPO beside a loaded server ({budget:.0f} s budget)",
             lambda: run_trl_loaded(model, budget, work / "trl-loaded"))  # fmt: skip
    print(f"held-out evaluation ({len(prompts)} prompts x {a.eval_samples}) ...", flush=True)
    ev = {"base": evaluate(model, None, prompts, a.eval_samples)}
    if res.get("tiller"):
        adapter = res["tiller"]["adapter_dir"]
        # Nothing promoted: Tiller serves the base model, so its held-out figures are the base's.
        ev["tiller"] = (
            evaluate(model, Path(adapter), prompts, a.eval_samples)
            if adapter
            else ev["base"] | {"note": "no promoted adapter: the base model"}
        )
    if res.get("trl"):
        ev["trl"] = evaluate(model, Path(res["trl"]["adapter"]), prompts, a.eval_samples)
    if res.get("trl_loaded"):
        ev["trl_loaded"] = evaluate(
            model, Path(res["trl_loaded"]["adapter"]), prompts, a.eval_samples
        )
    res["eval"] = ev
    from scipy import stats

    for other in ("trl", "trl_loaded"):
        if "tiller" in ev and other in ev:
            t = stats.ttest_ind(ev["tiller"]["rewards"], ev[other]["rewards"], equal_var=False)
            res[f"tiller_vs_{other}_p"] = float(t.pvalue)
    report(res, a.out, summarize, plot)


if __name__ == "__main__":
    main()
