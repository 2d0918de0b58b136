"""Run the bot as a real process (`python -m bot serve`) against simulators in this process.

Used by the crash tests and the benchmark: the bot is configured exactly as in production,
through the documented environment variables and a TOML file, and can be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

_INHERITED_OUT = ("SLACK_", "SF_AUTH_URL_", "SFP_", "FLEXDEPLOY_", "DATABASE_URL", "CHATOPS_CONFIG", "PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BotProcess:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack/events"

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.port}/healthz") as reply:
            return dict(await reply.json())

    def peak_rss_mb(self) -> float:
        """VmHWM: the most resident memory the process has had (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._log.close()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=20)
            except TimeoutError:
                await self.kill()
        self._log.close()


async def start_bot_process(
    *, workdir: Path, env: dict[str, str], config: Path, port: int | None = None, name: str = "bot"
) -> BotProcess:
    """Start `python -m bot serve` and wait until /healthz answers."""
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_OUT)}
    full_env.update(env)
    full_env["PORT"] = str(port)
    log_path = workdir / f"{name}.log"
    log = log_path.open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(config),
        "serve",
        "--host",
        "127.0.0.1",
        env=full_env,
        stdout=log,
        stderr=log,
        cwd=workdir,
    )
    bot = BotProcess(process=process, port=port, log_path=log_path, _log=log)
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if process.returncode is not None:
                raise RuntimeError(f"bot exited early:\n{log_path.read_text()[-3000:]}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                    if reply.status == 200:
                        return bot
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    await bot.kill()
    raise RuntimeError("bot did not become healthy in 30 s")
