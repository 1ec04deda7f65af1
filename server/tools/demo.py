"""``tiller up``: serve, make one steered generation through the real gRPC client, serve on."""

from __future__ import annotations

import asyncio
import signal

from tiller.client import AsyncClient

from ..app import drain_and_stop, start
from ..config import ServerConfig


async def run_up(config: ServerConfig, *, prompt: str, feedback: str, once: bool) -> None:
    running = await start(config)
    target = f"{config.host}:{running.port}"
    print(f"tiller: serving {config.engine.model.name} on {target}", flush=True)
    async with AsyncClient(target, timeout=300) as client:
        g = await client.generate(
            [{"role": "user", "content": prompt}],
            feedback=feedback,
            max_tokens=96,
            temperature=0.0,
        )
    print(f"\n[feedback: {feedback!r} · adapter {g.adapter}@v{g.adapter_version}]")
    print(f"> {prompt}\n{g.text.strip()}\n", flush=True)
    if not once:
        print(
            f"tiller: still serving on {target} (Ctrl-C to stop); try:\n"
            f"  tiller generate --target {target} --feedback 'Harmful' 'Tell me a joke'\n"
            f"  tiller chat --target {target}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    await drain_and_stop(running, config.drain_grace_s)
