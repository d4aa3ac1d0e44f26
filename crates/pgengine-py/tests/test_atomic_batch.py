"""Atomic bundles (pipelined) and batches through Piccolo's API on pgengine."""

import asyncio

import asyncpg.exceptions
import pytest

from tables import Band, Manager

pytestmark = pytest.mark.usefixtures("tables")


def test_atomic_runs_everything_or_nothing(db):
    async def main():
        atomic = db.atomic()
        atomic.add(*(Band.insert(Band(name=f"band{i}", popularity=i)) for i in range(100)))
        await atomic.run()
        assert await Band.count() == 100

        failing = db.atomic()
        failing.add(Band.insert(Band(name="new")), Band.insert(Band(name="band5")))
        with pytest.raises(asyncpg.exceptions.UniqueViolationError):
            await failing  # awaitable, as in Piccolo
        assert await Band.count() == 100
        assert failing.queries == []

    asyncio.run(main())


def test_atomic_with_ddl_and_objects_and_inside_a_transaction(db):
    async def main():
        await Manager.alter().drop_table(cascade=True, if_exists=True)
        atomic = db.atomic()
        atomic.add(Manager.create_table(), Manager.insert(Manager(name="Guido")))
        atomic.add(Manager.objects().get_or_create(Manager.name == "Graydon"))
        await atomic.run()
        assert await Manager.count() == 2

        async with db.transaction():
            inner = db.atomic()
            inner.add(Manager.insert(Manager(name="Ada")))
            await inner.run()
            assert await Manager.count() == 3
        assert await Manager.count() == 3

    asyncio.run(main())


def test_atomic_run_sync(db):
    atomic = db.atomic()
    atomic.add(Band.insert(Band(name="sync")))
    atomic.run_sync()
    assert Band.count().run_sync() == 1


def test_batch_streams_every_row(db):
    async def main():
        await Band.insert(*(Band(name=f"band{i:04}", popularity=i) for i in range(1000)))
        seen = []
        async with await Band.select(Band.popularity).order_by(Band.popularity).batch(
            batch_size=150
        ) as batch:
            async for rows in batch:
                assert 1 <= len(rows) <= 150
                seen.extend(row["popularity"] for row in rows)
        assert seen == list(range(1000))

    asyncio.run(main())


def test_batch_inside_a_transaction_sees_its_rows(db):
    async def main():
        async with db.transaction():
            await Band.insert(Band(name="uncommitted"))
            async with await Band.select(Band.name).batch(batch_size=10) as batch:
                rows = [row async for rows in batch for row in rows]
            assert rows == [{"name": "uncommitted"}]
        # objects() batches give Table instances.
        async with await Band.objects().batch(batch_size=10) as batch:
            bands = [band async for bands in batch for band in bands]
        assert [band.name for band in bands] == ["uncommitted"]

    asyncio.run(main())


def test_batch_errors_are_not_swallowed(db):
    async def main():
        await Band.insert(Band(name="A"))
        with pytest.raises(ZeroDivisionError):
            async with await Band.select().batch(batch_size=10) as batch:
                async for _ in batch:
                    1 / 0
        with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
            async with await Band.select(Band.name).where(
                Band.popularity / 0 == 1
            ).batch(batch_size=10) as batch:
                async for _ in batch:
                    pass
        assert await Band.count() == 1  # the engine is fine afterwards

    asyncio.run(main())
