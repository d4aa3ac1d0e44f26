"""Transactions, nesting and savepoints through Piccolo's API on pgengine."""

import asyncio

import asyncpg.exceptions
import pytest
from piccolo.engine.exceptions import TransactionError

from tables import Band

pytestmark = pytest.mark.usefixtures("tables")


async def names():
    return sorted(row["name"] for row in await Band.select(Band.name))


def test_commit_on_success_rollback_on_exception(db):
    async def main():
        async with db.transaction():
            await Band.insert(Band(name="kept"))
            assert db.transaction_exists()
        assert not db.transaction_exists()
        with pytest.raises(ZeroDivisionError):
            async with db.transaction():
                await Band.insert(Band(name="lost"))
                1 / 0
        assert await names() == ["kept"]

    asyncio.run(main())


def test_nested_joins_the_parent_or_is_refused(db):
    async def main():
        async with db.transaction() as outer:
            async with db.transaction() as inner:
                assert inner is outer
                await Band.insert(Band(name="A"))
            with pytest.raises(TransactionError):
                db.transaction(allow_nested=False)
            assert db.current_transaction.get() is outer
        assert await names() == ["A"]

    asyncio.run(main())


def test_savepoints(db):
    async def main():
        async with db.transaction() as transaction:
            await Band.insert(Band(name="A"))
            savepoint = await transaction.savepoint()
            assert savepoint.name == "savepoint_1"
            await Band.insert(Band(name="B"))
            await savepoint.rollback_to()
            named = await transaction.savepoint("before_c")
            await Band.insert(Band(name="C"))
            await named.release()
            await transaction.savepoint("before_d")
            await Band.insert(Band(name="D"))
            await transaction.rollback_to("before_d")
            with pytest.raises(ValueError):
                await transaction.savepoint("x; DROP TABLE band")
        assert await names() == ["A", "C"]

    asyncio.run(main())


def test_a_failed_statement_is_recovered_with_a_savepoint(db):
    async def main():
        async with db.transaction() as transaction:
            await Band.insert(Band(name="A"))
            savepoint = await transaction.savepoint()
            with pytest.raises(asyncpg.exceptions.UniqueViolationError):
                await Band.insert(Band(name="A"))
            await savepoint.rollback_to()
            await Band.insert(Band(name="B"))
        assert await names() == ["A", "B"]

    asyncio.run(main())


def test_committing_an_aborted_transaction_raises_and_saves_nothing(db):
    async def main():
        with pytest.raises(Exception) as caught:
            async with db.transaction():
                await Band.insert(Band(name="A"))
                try:
                    await Band.insert(Band(name="A"))
                except asyncpg.exceptions.UniqueViolationError:
                    pass  # swallowed by the user: the commit must still fail
        assert not isinstance(caught.value, RuntimeError)
        assert await names() == []
        assert not db.transaction_exists()

    asyncio.run(main())


def test_manual_commit_and_rollback(db):
    async def main():
        async with db.transaction() as transaction:
            await Band.insert(Band(name="A"))
            await transaction.commit()
        async with db.transaction() as transaction:
            await Band.insert(Band(name="B"))
            await transaction.rollback()
        assert await names() == ["A"]

    asyncio.run(main())


def test_child_tasks_inherit_the_transaction_and_share_it(db):
    async def main():
        async with db.transaction():
            await asyncio.gather(*(Band.insert(Band(name=f"band{i}")) for i in range(20)))
            # Visible inside, not yet outside.
            assert len(await names()) == 20
        assert len(await names()) == 20

        with pytest.raises(KeyError):
            async with db.transaction():
                await asyncio.gather(*(Band.insert(Band(name=f"more{i}")) for i in range(5)))
                raise KeyError("roll it all back")
        assert len(await names()) == 20

    asyncio.run(main())
