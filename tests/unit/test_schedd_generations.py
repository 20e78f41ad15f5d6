"""The generations schedd stamps on its views: a block reserved in the store at once.

Each view used to cost one store write (an fsync) before agentd heard of a new
deployment; now a view costs none until the block is used up, and a restarted
schedd still starts above every generation handed out before.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemons.schedd.store import Store, StoreThread
from daemons.schedd.views import GENERATION_BLOCK, Generations


def test_generations_grow_across_restarts_with_one_store_write_per_block(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "state.db")
        generations = Generations(store, StoreThread())
        handed = [await generations.next() for _ in range(5)]
        assert handed == sorted(set(handed)) and handed[0] >= 1
        reserved = store.generation()
        assert reserved >= handed[-1]
        for _ in range(3):  # the views after the first write nothing
            handed.append(await generations.next())
        assert store.generation() == reserved

        # a holder held a newer one: the next goes past it
        handed.append(await generations.next(handed[-1] + 7))
        assert handed[-1] == handed[-2] + 8

        # past the block: a new one, reserved before it is handed out
        while generations.value < reserved:
            handed.append(await generations.next())
        handed.append(await generations.next())
        assert store.generation() >= handed[-1] > reserved
        assert handed == sorted(set(handed))
        store.close()

        # a restarted schedd never hands out one its predecessor did
        reopened = Store(tmp_path / "state.db")
        after = await Generations(reopened, StoreThread()).next()
        assert after > max(handed) and after > GENERATION_BLOCK
        reopened.close()

    asyncio.run(run())
