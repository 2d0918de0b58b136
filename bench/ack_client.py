"""The load generator of the ack benchmark, in a process of its own: `python -m bench.ack_client PLAN`.

It only signs, sends and times. The simulators and the fake Slack (which the bot answers through
response_url right after each ack) live in the parent process; measured from there, their work
would delay the reading of the acks and be counted as the bot's latency.

PLAN is a JSON file: ``{"url", "secret", "concurrency", "pause", "bodies": [form bodies]}``; the
bodies are sent ``concurrency`` at a time, with ``pause`` seconds between rounds. Prints a JSON
list of the latencies in seconds, in the order the bodies were given.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


def signed_headers(secret: bytes, body: bytes) -> dict[str, str]:
    timestamp = str(int(time.time()))
    digest = hmac.new(secret, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": f"v0={digest}",
    }


async def run(plan: dict[str, Any]) -> list[float]:
    secret = str(plan["secret"]).encode()
    bodies = [str(body).encode() for body in plan["bodies"]]
    size = int(plan["concurrency"])
    samples: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(body: bytes) -> float:
            headers = signed_headers(secret, body)
            started = time.perf_counter()
            async with session.post(plan["url"], data=body, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"the bot answered HTTP {reply.status}")
            return time.perf_counter() - started

        for start in range(0, len(bodies), size):
            samples += await asyncio.gather(*(one(body) for body in bodies[start : start + size]))
            await asyncio.sleep(float(plan["pause"]))
    return samples


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(asyncio.run(run(plan))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
