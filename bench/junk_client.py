"""Anonymous junk for the ack benchmark, in a process of its own: `python -m bench.junk_client URL COUNT BYTES`.

Keeps COUNT unsigned POSTs of BYTES bytes each in flight to URL until its standard input closes,
each sent again PAUSE seconds after it is answered (a bot that refuses junk at once would
otherwise face a flood whose cost, on a small machine, is mostly this generator's own CPU).
Every third one is chunked, so it carries no Content-Length for the bot to refuse it by. Prints
``ready`` once the first ones are on their way, and at the end a JSON object counting the
answers by HTTP status (``"reset"`` when the bot hung up before answering).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp

CHUNK = 64 * 1024
PAUSE = 0.1


async def run(url: str, *, count: int, size: int) -> Counter[str]:
    # Many tiny form fields: the costliest body to parse (Bolt's adapter used to parse it before
    # checking the signature: about 0.6 s of CPU per 2 MB).
    body = b"a=b&" * (size // 4)
    answers: Counter[str] = Counter()
    stop = asyncio.Event()

    async def in_chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), CHUNK):
            yield body[start : start + CHUNK]

    async def keep_sending(session: aiohttp.ClientSession, *, chunked: bool) -> None:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        while not stop.is_set():
            try:
                async with session.post(url, data=in_chunks() if chunked else body, headers=headers) as reply:
                    await reply.read()
                    answers[str(reply.status)] += 1
            except aiohttp.ClientError:
                answers["reset"] += 1
            await asyncio.sleep(PAUSE)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        senders = [asyncio.create_task(keep_sending(session, chunked=index % 3 == 0)) for index in range(count)]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
        stop.set()
        await asyncio.gather(*senders)
    return answers


def main() -> int:
    url, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(dict(asyncio.run(run(url, count=count, size=size)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
