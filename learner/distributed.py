"""One training run on several processes: ``accelerate launch`` of ``train`` over frozen data.

``train`` with ``TrainConfig.processes > 1``, called outside a multi-process run (``tiller
learn``'s training stage, ``tiller align``, a script), comes here. ``launch`` writes the run
(examples, config, model, output, resume) under ``<out_dir>.launch/`` and runs::

    accelerate launch --multi_gpu --num_processes N --module tiller.learner.distributed run SPEC

Every launched process calls ``trainer.train_here`` on the same examples and trains
data-parallel (the split of each step is in ``trainer``); rank 0 writes the checkpoints, the
adapter and ``result.json``, which ``launch`` returns as the ``TrainResult``. The rest of
``tiller learn`` (sampling, gate, publish, the iteration's record) stays in the one learner
process, so a version is still published once.

On the CPU the processes talk over gloo: ``accelerate launch --cpu`` starts a single process
unless MPI is installed, so the launch is torchrun's (``--multi_gpu``) with
``ACCELERATE_USE_CPU`` set. With ``accelerate_config`` the file chooses the distributed type
(e.g. FSDP); the number of processes is still ``processes``.

A launch dies with its caller: the launching process (``launcher`` below, accelerate's launcher
run in-process) asks the kernel for SIGTERM when its parent dies, torchrun then stops the
workers, and each worker asks for SIGKILL when the launcher dies. Checkpoints make the next
``resume`` continue.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tiller.server.formats.sections import build_section

from .data.examples import PreferencePair, SFTExample
from .data.jsonl import load_pairs, load_sft, save_pairs, save_sft
from .precision import train_device
from .trainer import OBJECTIVES, PAIR_OBJECTIVES, TrainConfig, TrainResult, train_here

MODULE = "tiller.learner.distributed"
_PR_SET_PDEATHSIG = 1


def launched() -> bool:
    """Whether this process is one of a multi-process run (torchrun, MPI)."""
    from accelerate.utils import get_int_from_env

    size = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
    return get_int_from_env(size, 1) > 1


def launch_dir(out_dir: Path) -> Path:
    """Where a launch of a run writing ``out_dir`` keeps its spec, examples and result."""
    return out_dir.parent / f"{out_dir.name}.launch"


def write_spec(
    model_dir: Path,
    examples: Sequence[SFTExample] | Sequence[PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    init_adapter: Path | None = None,
    *,
    resume: bool = False,
) -> Path:
    """The run as files under ``launch_dir(out_dir)``; returns the spec's path."""
    pairs = config.objective in PAIR_OBJECTIVES
    want = PreferencePair if pairs else SFTExample
    for i, ex in enumerate(examples):
        if not isinstance(ex, want):
            raise TypeError(
                f"objective {config.objective!r} trains on {want.__name__}; "
                f"example {i} is a {type(ex).__name__}"
            )
    work = launch_dir(Path(out_dir))
    work.mkdir(parents=True, exist_ok=True)
    if pairs:
        save_pairs(work / "examples.jsonl", examples)  # type: ignore[arg-type]
    else:
        save_sft(work / "examples.jsonl", examples)  # type: ignore[arg-type]
    spec = {
        "model_dir": str(model_dir),
        "out_dir": str(out_dir),
        "init_adapter": None if init_adapter is None else str(init_adapter),
        "resume": resume,
        "config": json.loads(json.dumps(asdict(config), default=str)),
    }
    path = work / "spec.json"
    tmp = work / "spec.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(path)
    return path


def config_from_json(raw: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` a spec holds, type-checked like a config file's ``[train]``."""
    d = dict(raw)
    objective = OBJECTIVES[d["objective"]]
    d["objective_config"] = build_section(objective, d["objective_config"], "[spec objective]")
    return build_section(TrainConfig, d, "[spec config]")


def launch_command(
    spec: Path, config: TrainConfig, script: Sequence[str] = ("--module", MODULE, "run")
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that train ``spec`` on ``config.processes`` processes;
    ``script``: what each process runs, before the spec's path (accelerate's script args)."""
    with socket.socket() as s:  # the rendezvous port: one free now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--num_processes", str(config.processes), "--num_machines", "1"]
    args += ["--main_process_port", str(port), "--dynamo_backend", "no"]
    if config.accelerate_config is not None:
        args += ["--config_file", str(config.accelerate_config)]
    else:
        args += ["--multi_gpu", "--mixed_precision", "no"]
    env = dict(os.environ)
    if train_device(config).type == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", MODULE, "launcher", str(os.getpid()), *args]
    return [*cmd, *script, str(spec)], env


def launch(
    model_dir: Path,
    examples: Sequence[SFTExample] | Sequence[PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    init_adapter: Path | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """``train`` on ``config.processes`` processes; blocks until they finish. ``RuntimeError``
    when the launch fails (the processes' output went to this process's stdout/stderr)."""
    spec = write_spec(model_dir, examples, config, out_dir, init_adapter, resume=resume)
    result = spec.parent / "result.json"
    result.unlink(missing_ok=True)
    cmd, env = launch_command(spec, config)
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code != 0 or not result.exists():
        raise RuntimeError(
            f"training on {config.processes} processes failed (exit {code}): {' '.join(cmd)}"
        )
    return result_from_json(json.loads(result.read_text()))


def result_to_json(r: TrainResult) -> dict[str, Any]:
    return {**asdict(r), "adapter_dir": str(r.adapter_dir), "history": list(r.history)}


def result_from_json(raw: dict[str, Any]) -> TrainResult:
    return TrainResult(
        adapter_dir=Path(raw["adapter_dir"]),
        steps=raw["steps"],
        final_loss=raw["final_loss"],
        samples_per_s=raw["samples_per_s"],
        history=tuple(raw["history"]),
        resumed_from_step=raw["resumed_from_step"],
    )


def run(spec: Path) -> TrainResult:
    """One launched process's part of the run in ``spec``; rank 0 writes ``result.json``."""
    from accelerate import PartialState

    raw = json.loads(spec.read_text())
    config = config_from_json(raw["config"])
    load = load_pairs if config.objective in PAIR_OBJECTIVES else load_sft
    examples = load(spec.parent / "examples.jsonl")
    init = None if raw["init_adapter"] is None else Path(raw["init_adapter"])
    out = Path(raw["out_dir"])
    result = train_here(Path(raw["model_dir"]), examples, config, out, init, resume=raw["resume"])
    if PartialState().is_main_process:
        tmp = spec.parent / "result.json.tmp"
        tmp.write_text(json.dumps(result_to_json(result)))
        tmp.replace(spec.parent / "result.json")
    return result


def _die_with_parent(sig: int, parent: int) -> None:
    """Ask the kernel for ``sig`` when the parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the request
        os.kill(os.getpid(), sig)


USAGE = f"""usage: python -m {MODULE} launcher PARENT_PID ACCELERATE_LAUNCH_ARGS...
       python -m {MODULE} run SPEC   (one process of `accelerate launch`)"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "launcher" and args[1].isdigit():
        _die_with_parent(signal.SIGTERM, int(args[1]))
        from accelerate.commands.launch import launch_command as accelerate_launch
        from accelerate.commands.launch import launch_command_parser

        accelerate_launch(launch_command_parser().parse_args(args[2:]))
        return 0
    if len(args) == 2 and args[0] == "run":
        _die_with_parent(signal.SIGKILL, os.getppid())
        logger = logging.getLogger("tiller.learner")
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
        run(Path(args[1]))
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
