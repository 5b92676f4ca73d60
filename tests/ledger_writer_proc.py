"""A ledger writer process for the kill -9 test: appends as fast as it can from many
concurrent tasks and prints ``index entry_id`` for every acknowledged entry."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from distillguard.exchange import Exchange
from distillguard.ledger.settings import LedgerConfig
from distillguard.ledger.writer import LedgerWriter


async def main(directory: str, tasks: int) -> None:
    config = LedgerConfig(url=f"sqlite:///{Path(directory) / 'ledger.sqlite'}",
                          key_path=Path(directory) / "ledger.key",
                          checkpoint_interval_s=0.05, max_batch=512)
    writer = LedgerWriter(config)
    await writer.start()
    out = sys.stdout

    async def produce(n: int) -> None:
        i = 0
        while True:
            i += 1
            if i % 5 == 0:
                idx = await writer.append_event("test:writer:tick", f"task:{n}", None, None,
                                                {"i": i})
                out.write(f"{idx} event\n")
            else:
                ex = Exchange.start("/v1/chat/completions")
                ex.account_id, ex.status = f"acct_{n}", 200
                ex.request = {"model": "m", "messages": [{"role": "user", "content": f"{i}"}]}
                ex.response = {"choices": [{"message": {"content": "x" * (i % 50)}}]}
                idx = await writer.append_exchange(ex)
                out.write(f"{idx} {ex.id}\n")
            out.flush()

    print("ready", flush=True)
    await asyncio.gather(*(produce(n) for n in range(tasks)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
