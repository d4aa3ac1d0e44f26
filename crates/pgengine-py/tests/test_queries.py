"""Piccolo's queries on pgengine: inserts, selects, updates, deletes, raw SQL, and every
type both ways, with asyncpg's Python types."""

import asyncio
import datetime
import decimal
import uuid

import asyncpg.exceptions
import pytest

from tables import AllTypes, Band, Manager

pytestmark = pytest.mark.usefixtures("tables")


def run(coroutine):
    return asyncio.run(coroutine)


def test_insert_select_update_delete():
    async def main():
        manager = Manager(name="Guido")
        await manager.save()
        await Band.insert(
            Band(name="Pythonistas", manager=manager.id, popularity=1000),
            Band(name="Rustaceans", popularity=2000),
        )
        rows = await Band.select(Band.name, Band.manager.name).order_by(Band.name)
        assert rows == [
            {"name": "Pythonistas", "manager.name": "Guido"},
            {"name": "Rustaceans", "manager.name": None},
        ]
        await Band.update({Band.popularity: 3000}).where(Band.name == "Rustaceans")
        assert await Band.select(Band.popularity).where(Band.name == "Rustaceans").first() == {
            "popularity": 3000
        }
        assert await Band.count() == 2
        assert await Band.exists().where(Band.popularity > 2500)
        band = await Band.objects().get(Band.name == "Pythonistas")
        assert band.popularity == 1000
        await Band.delete().where(Band.popularity < 2000)
        assert await Band.select(Band.name) == [{"name": "Rustaceans"}]

    run(main())


def test_raw_sql_with_arguments_and_braces():
    async def main():
        rows = await Band.raw("SELECT {}::int + {}::int AS sum, '{{}}'::text AS braces", 1, 2)
        assert rows == [{"sum": 3, "braces": "{}"}]

    run(main())


def test_every_type_both_ways():
    values = {
        "integer": 2_000_000_000,
        "big": 9_000_000_000_000,
        "small": -32768,
        "real": 1.5,
        "double": 3.141592653589793,
        "numeric": decimal.Decimal("-12345678901234.500000"),
        "varchar": "héllo",
        "text": "a 'quoted' {brace} $1",
        "boolean": True,
        "bytea": b"\x00\x01\xff",
        "timestamp": datetime.datetime(2024, 2, 29, 23, 59, 59, 123456),
        "timestamptz": datetime.datetime(
            2024, 2, 29, 23, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
        ),
        "date": datetime.date(1999, 12, 31),
        "time": datetime.time(13, 14, 15, 16),
        "interval": datetime.timedelta(days=3, seconds=7, microseconds=9),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "json": '{"a": [1, 2]}',
        "jsonb": '{"b": null}',
        "ints": [1, None, 3],
        "texts": ["x", "", "z"],
    }

    async def main():
        await AllTypes.insert(AllTypes(**values))
        await AllTypes.insert(AllTypes())  # all NULL
        rows = await AllTypes.select(*[getattr(AllTypes, k) for k in values]).order_by(AllTypes.id)
        got = rows[0]
        for key, value in values.items():
            if key == "timestamptz":
                # asyncpg's form: aware, in UTC.
                assert got[key] == value
                assert got[key].utcoffset() == datetime.timedelta(0)
            elif key == "jsonb":
                assert got[key] == '{"b": null}'
            else:
                assert got[key] == value, key
            assert type(got[key]) is type(value) or key == "timestamptz", key
        assert all(v is None for v in rows[1].values())
        # Values as parameters in a WHERE clause, inferred by the server.
        found = await AllTypes.select(AllTypes.id).where(
            (AllTypes.uuid == values["uuid"])
            & (AllTypes.numeric == values["numeric"])
            & (AllTypes.timestamptz == values["timestamptz"])
            & (AllTypes.interval == values["interval"])
            & (AllTypes.date == values["date"])
        )
        assert len(found) == 1

    run(main())


def test_arrays_infinity_and_special_values():
    async def main():
        rows = await Band.raw(
            "SELECT {}::int[] AS matrix, 'infinity'::date AS d, '-infinity'::timestamp AS t,"
            " 'NaN'::numeric AS nan, {}::numeric AS big, '1 mon 2 days'::interval AS i,"
            " {}::date AS dmax, NULL::int AS nothing",
            [[1, 2], [3, None]],
            10**30,
            datetime.date.max,
        )
        row = rows[0]
        assert row["matrix"] == [[1, 2], [3, None]]
        assert row["d"] == datetime.date.max
        assert row["t"] == datetime.datetime.min
        assert row["nan"].is_nan()
        assert row["big"] == decimal.Decimal(10**30)
        assert row["i"] == datetime.timedelta(days=32)  # a month is 30 days, as asyncpg
        assert row["dmax"] == datetime.date.max
        assert row["nothing"] is None

    run(main())


def test_database_errors_are_asyncpg_classes():
    async def main():
        await Band.insert(Band(name="A"))
        with pytest.raises(asyncpg.exceptions.UniqueViolationError) as caught:
            await Band.insert(Band(name="A"))
        assert caught.value.sqlstate == "23505"
        assert caught.value.constraint_name == "band_name_key"
        with pytest.raises(asyncpg.exceptions.ForeignKeyViolationError):
            await Band.insert(Band(name="B", manager=12345))
        with pytest.raises(asyncpg.exceptions.PostgresSyntaxError):
            await Band.raw("SELEC 1")
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await Band.raw("SELECT * FROM no_such_table")

    run(main())


def test_values_that_do_not_fit_are_clear_errors():
    async def main():
        with pytest.raises(asyncpg.exceptions.DataError, match="int"):
            await Band.raw("SELECT {}::int", "not a number")
        with pytest.raises(asyncpg.exceptions.DataError, match="out of int4 range"):
            await Band.raw("SELECT {}::int", 2**40)
        with pytest.raises(TypeError, match="object"):
            await Band.raw("SELECT {}::text", object())
        with pytest.raises(asyncpg.exceptions.DataError, match="matching dimensions"):
            await Band.raw("SELECT {}::int[]", [[1, 2], [3]])
        # The engine is still fine afterwards.
        assert await Band.raw("SELECT 1 AS one") == [{"one": 1}]

    run(main())
