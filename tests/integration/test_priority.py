"""Priority scheduling on a real engine with one seat (``--max-num-seqs 1``): a waiting
interactive request runs before background requests that arrived earlier, and background
requests still finish once users pause."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import Client
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.server.edge import PRIORITY_BACKGROUND


@pytest.fixture(scope="module")
def one_seat(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, server: object
) -> Iterator[ServerProc]:
    # `server` (the session one) first: engines never start concurrently on 2 cores.
    srv = start_server(
        tiny_model, tmp_path_factory.mktemp("one-seat"), "--no-log", "--", "--max-num-seqs", "1"
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def under_load(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, one_seat: ServerProc
) -> Iterator[ServerProc]:
    # After `one_seat` (stopped at module end): engines never start concurrently on 2 cores.
    srv = start_server(
        tiny_model, tmp_path_factory.mktemp("under-load"), "--no-log",
        "--background-seats-under-load", "2", "--", "--max-num-seqs", "16",
    )  # fmt: skip
    yield srv
    stop_server(srv)


def test_the_edge_knows_the_proto_s_background_value() -> None:
    assert PRIORITY_BACKGROUND == pb.PRIORITY_BACKGROUND


def _wait_busy(target: str, n: int, what: str = "engine_unfinished") -> None:
    """Until ``n`` requests are in the engine (or, ``in_flight``, accepted by the server)."""
    with Client(target, timeout=30) as c:
        deadline = time.monotonic() + 60
        while getattr(c.status(), what) < n:
            assert time.monotonic() < deadline, f"{what} never reached {n}"
            time.sleep(0.01)


def test_a_waiting_user_request_goes_before_earlier_background_ones(one_seat: ServerProc) -> None:
    done: list[str] = []
    release = threading.Event()

    def hold() -> None:
        # Holds the one seat until released (closing the stream cancels the request).
        with Client(one_seat.target, timeout=300) as c:
            for _ in c.stream("def holder(x):", max_tokens=1900, temperature=0.0,
                              ignore_eos=True, priority="background"):  # fmt: skip
                if release.is_set():
                    break

    def run(name: str, priority: str) -> None:
        with Client(one_seat.target, timeout=300) as c:
            c.generate(f"def {name}(x):", max_tokens=24, temperature=0.0, ignore_eos=True,
                       priority=priority)  # fmt: skip
        done.append(name)

    # The one seat is taken by a background request; then two more background requests and
    # one interactive request queue up, in that order of arrival.
    holder = threading.Thread(target=hold)
    holder.start()
    _wait_busy(one_seat.target, 1)
    threads = []
    for name, priority in (("bg1", "background"), ("bg2", "background"), ("user", "interactive")):
        t = threading.Thread(target=run, args=(name, priority))
        t.start()
        threads.append(t)
        _wait_busy(one_seat.target, 1 + len(threads), "in_flight")  # arrival order = start order
    # The holder has the one background seat (a quarter of one seat is still one): bg1 and bg2
    # wait for it in the server, only the user's request waits in the engine.
    _wait_busy(one_seat.target, 2)
    with Client(one_seat.target) as c:
        assert c.status().engine_unfinished == 2
    release.set()
    for t in [holder, *threads]:
        t.join(timeout=300)
    assert len(done) == 3
    assert done.index("user") < done.index("bg1") < done.index("bg2"), done


def test_background_requests_finish_when_users_pause(one_seat: ServerProc) -> None:
    stop = threading.Event()
    served = [0]

    def user() -> None:
        with Client(one_seat.target, timeout=300) as c:
            while not stop.is_set():
                c.generate("def user(x):", max_tokens=16, temperature=0.0)
                served[0] += 1

    users = [threading.Thread(target=user) for _ in range(3)]
    for t in users:
        t.start()
    _wait_busy(one_seat.target, 2)
    result: list[object] = []
    background = threading.Thread(
        target=lambda: result.append(
            Client(one_seat.target, timeout=300).generate(
                "def learner(x):", max_tokens=16, temperature=0.0, priority="background"
            )
        )
    )
    background.start()
    time.sleep(3.0)
    stop.set()
    for t in users:
        t.join(timeout=120)
    background.join(timeout=120)
    assert served[0] > 0 and len(result) == 1, "the background request starved"


def test_background_work_shrinks_to_its_under_load_seats_while_a_user_runs(
    under_load: ServerProc,
) -> None:
    # 16 seats, so a quarter (4) for background work when no user is in the engine and
    # `--background-seats-under-load` (2) while one is. Every holder re-asks until released:
    # a tiny model can finish even 1900 tokens within the test.
    server = under_load
    release_user, release_bg = threading.Event(), threading.Event()

    def hold(priority: str, release: threading.Event) -> None:
        with Client(server.target, timeout=300) as c:
            while not release.is_set():
                for _ in c.stream(f"def {priority}(x):", max_tokens=1900, temperature=0.0,
                                  ignore_eos=True, priority=priority):  # fmt: skip
                    if release.is_set():
                        break

    def engine_counts(seconds: float) -> list[int]:
        with Client(server.target) as c:
            out = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                out.append(c.status().engine_unfinished)
                time.sleep(0.02)
            return out

    user = threading.Thread(target=hold, args=("interactive", release_user))
    user.start()
    _wait_busy(server.target, 1)
    background = [threading.Thread(target=hold, args=("background", release_bg)) for _ in range(4)]
    for t in background:
        t.start()
    _wait_busy(server.target, 5, "in_flight")
    _wait_busy(server.target, 3)
    counts = engine_counts(1.0)
    assert max(counts) == 3, counts  # the user and at most two background sequences
    release_user.set()
    user.join(timeout=120)
    _wait_busy(server.target, 4)  # the user left: every background request gets a seat
    release_bg.set()
    for t in background:
        t.join(timeout=120)
