"""Tables of the tests, on the engine of piccolo_conf.py (found by Piccolo itself)."""

import asyncio

from piccolo.columns import (
    JSON,
    JSONB,
    UUID,
    Array,
    BigInt,
    Boolean,
    Bytea,
    Date,
    DoublePrecision,
    ForeignKey,
    Integer,
    Interval,
    Numeric,
    Real,
    SmallInt,
    Text,
    Time,
    Timestamp,
    Timestamptz,
    Varchar,
)
from piccolo.table import Table, create_db_tables, drop_db_tables


class Manager(Table):
    name = Varchar(length=50, unique=True)


class Band(Table):
    name = Varchar(length=50, unique=True)
    manager = ForeignKey(references=Manager, null=True)
    popularity = Integer(default=0)


class AllTypes(Table):
    integer = Integer(null=True, default=None)
    big = BigInt(null=True, default=None)
    small = SmallInt(null=True, default=None)
    real = Real(null=True, default=None)
    double = DoublePrecision(null=True, default=None)
    numeric = Numeric(digits=(20, 6), null=True, default=None)
    varchar = Varchar(null=True, default=None)
    text = Text(null=True, default=None)
    boolean = Boolean(null=True, default=None)
    bytea = Bytea(null=True, default=None)
    timestamp = Timestamp(null=True, default=None)
    timestamptz = Timestamptz(null=True, default=None)
    date = Date(null=True, default=None)
    time = Time(null=True, default=None)
    interval = Interval(null=True, default=None)
    uuid = UUID(null=True, default=None)
    json = JSON(null=True, default=None)
    jsonb = JSONB(null=True, default=None)
    ints = Array(Integer(), null=True, default=None)
    texts = Array(Varchar(), null=True, default=None)


TABLES = [Manager, Band, AllTypes]


def create_tables() -> None:
    asyncio.run(drop_db_tables(*reversed(TABLES)))
    asyncio.run(create_db_tables(*TABLES))


def drop_tables() -> None:
    asyncio.run(drop_db_tables(*reversed(TABLES)))
