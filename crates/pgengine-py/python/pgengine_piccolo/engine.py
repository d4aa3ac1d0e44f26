"""Piccolo's engine API on pgengine: ``PgenginePostgresEngine`` and its transaction,
savepoint, atomic and batch classes. Queries run on pgengine's pool (or the current
transaction's connection); values are converted in Rust as asyncpg converts them; database
errors are asyncpg's exception classes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import asyncpg.exceptions
from piccolo.engine.base import (
    BaseAtomic,
    BaseBatch,
    BaseTransaction,
    validate_savepoint_name,
)
from piccolo.engine.exceptions import TransactionError
from piccolo.engine.postgres import PostgresEngine
from piccolo.query.base import DDL, Query
from piccolo.querystring import QueryString
from piccolo.utils.sync import run_sync
from piccolo.utils.warnings import Level, colored_warning

from . import _native

# asyncpg connect() arguments that pgengine takes; others are ignored with a warning.
_CONNECT_KEYS = {"dsn", "host", "port", "user", "password", "database"}


def _connect_args(config: Mapping[str, Any], max_size: Optional[int]) -> dict:
    """pgengine's connection settings from Piccolo's ``config`` (asyncpg's arguments)."""
    ignored = sorted(set(config) - _CONNECT_KEYS)
    if ignored:
        colored_warning(
            f"PgenginePostgresEngine ignores these config keys: {ignored}",
            level=Level.medium,
        )
    env = os.environ
    port = config.get("port") or env.get("PGPORT")
    return {
        "url": config.get("dsn"),
        "host": config.get("host") or (None if config.get("dsn") else env.get("PGHOST")),
        "port": int(port) if port else None,
        "user": config.get("user") or env.get("PGUSER"),
        "password": config.get("password") or env.get("PGPASSWORD"),
        "database": config.get("database") or env.get("PGDATABASE"),
        "max_connections": max_size,
    }


class PgenginePostgresEngine(PostgresEngine):
    """Piccolo's ``PostgresEngine``, with the same constructor, running on pgengine.

    A pool is always used (opened lazily; ``start_connection_pool`` opens it up front,
    ``max_size`` sets its size). ``close_connection_pool`` closes it; the next query
    opens a new one.
    """

    def __init__(
        self,
        config: dict[str, Any],
        extensions: Sequence[str] = tuple(),
        log_queries: bool = False,
        log_responses: bool = False,
        extra_nodes: Optional[Mapping[str, PostgresEngine]] = None,
    ) -> None:
        self._native: Optional[_native.Engine] = None
        self._max_size: Optional[int] = None
        super().__init__(
            config=config,
            extensions=extensions,
            log_queries=log_queries,
            log_responses=log_responses,
            extra_nodes=extra_nodes,
        )

    async def native(self) -> _native.Engine:
        """The pgengine engine (created on first use)."""
        native = self._native
        if native is None:
            native = await _native.Engine.connect(
                **_connect_args(self.config, self._max_size)
            )
            if self._native is None:
                self._native = native
            else:  # another task made one meanwhile
                native = self._native
        return native

    ###########################################################################
    # Version and set-up

    async def get_version(self) -> float:
        try:
            response = await (await self.native()).fetch("SHOW server_version", [])
        except ConnectionRefusedError as exception:
            # As Piccolo: importing piccolo_conf.py must not fail.
            colored_warning(f"Unable to connect to database - {exception}")
            return 0.0
        return self._parse_raw_version_string(
            version_string=response[0]["server_version"]
        )

    def get_version_sync(self) -> float:
        return run_sync(self.get_version())

    async def prep_database(self):
        for extension in self.extensions:
            try:
                await (await self.native()).run_ddl(
                    f'CREATE EXTENSION IF NOT EXISTS "{extension}"'
                )
            except asyncpg.exceptions.InsufficientPrivilegeError:
                colored_warning(
                    f"=> Unable to create {extension} extension - some "
                    "functionality may not behave as expected. Make sure "
                    "your database user has permission to create "
                    "extensions, or add it manually using "
                    f'`CREATE EXTENSION "{extension}";`',
                    level=Level.medium,
                )

    ###########################################################################
    # Pool

    async def start_connection_pool(self, **kwargs) -> None:
        if self.pool:
            colored_warning(
                "A pool already exists - close it first if you want to create "
                "a new pool.",
            )
            return
        max_size = kwargs.get("max_size")
        if max_size is not None and max_size != self._max_size:
            self._max_size = max_size
            old, self._native = self._native, None
            if old is not None:
                await old.close_connection_pool()
        native = await self.native()
        await native.start_connection_pool()
        self.pool = native

    async def close_connection_pool(self) -> None:
        if not self.pool:
            colored_warning("No pool is running.")
            return
        native, self._native, self.pool = self._native, None, None
        if native is not None:
            await native.close_connection_pool()

    async def get_new_connection(self):
        raise NotImplementedError(
            "PgenginePostgresEngine has no asyncpg connections: run queries "
            "through the engine, or a transaction"
        )

    async def _run_in_pool(self, query: str, args: Optional[Sequence[Any]] = None):
        return await (await self.native()).fetch(query, list(args or []))

    async def _run_in_new_connection(
        self, query: str, args: Optional[Sequence[Any]] = None
    ):
        # pgengine always uses its pool: no query pays a new connection's handshake.
        return await (await self.native()).fetch(query, list(args or []))

    ###########################################################################
    # Queries

    async def run_querystring(self, querystring: QueryString, in_pool: bool = True):
        query, query_args = querystring.compile_string(engine_type=self.engine_type)
        query_id = self.get_query_id()
        if self.log_queries:
            self.print_query(query_id=query_id, query=querystring.__str__())
        transaction = self.current_transaction.get()
        if transaction is not None:
            response = await transaction.native.fetch(query, query_args)
        else:
            response = await (await self.native()).fetch(query, query_args)
        if self.log_responses:
            self.print_response(query_id=query_id, response=response)
        return response

    async def run_ddl(self, ddl: str, in_pool: bool = True):
        query_id = self.get_query_id()
        if self.log_queries:
            self.print_query(query_id=query_id, query=ddl)
        transaction = self.current_transaction.get()
        if transaction is not None:
            response = await transaction.native.fetch(ddl, [])
        else:
            response = await (await self.native()).fetch(ddl, [])
        if self.log_responses:
            self.print_response(query_id=query_id, response=response)
        return response

    def transform_response_to_dicts(self, results) -> list[dict]:
        return results  # rows already are dicts

    async def batch(
        self,
        query: Query,
        batch_size: int = 100,
        node: Optional[str] = None,
    ) -> PgengineBatch:
        engine: Any = self.extra_nodes.get(node) if node else self
        return PgengineBatch(engine=engine, query=query, batch_size=batch_size)

    def atomic(self) -> PgengineAtomic:
        return PgengineAtomic(engine=self)

    def transaction(self, allow_nested: bool = True) -> PgengineTransaction:
        return PgengineTransaction(engine=self, allow_nested=allow_nested)


###############################################################################


class PgengineSavepoint:
    """A savepoint of a ``PgengineTransaction``: ``rollback_to()``, ``release()``."""

    def __init__(self, name: str, transaction: PgengineTransaction, native):
        self.name = name
        self.transaction = transaction
        self._native = native

    async def rollback_to(self):
        await self._native.rollback_to()

    async def release(self):
        await self._native.release()


class PgengineTransaction(BaseTransaction):
    """Piccolo's ``PostgresTransaction`` on pgengine: an async context manager that
    commits on success and rolls back on an exception. Inside another transaction it
    returns that one (``allow_nested=True``) or raises ``TransactionError``.

    Committing a transaction that a failed statement aborted raises (nothing is saved),
    rather than rolling back silently.
    """

    def __init__(self, engine: PgenginePostgresEngine, allow_nested: bool = True):
        self.engine = engine
        self.native = None
        self._savepoint_id = 0
        self._parent = None
        self._committed = False
        self._rolled_back = False
        current_transaction = engine.current_transaction.get()
        if current_transaction:
            if allow_nested:
                self._parent = current_transaction
            else:
                raise TransactionError(
                    "A transaction is already active - nested transactions "
                    "aren't allowed."
                )

    async def __aenter__(self) -> PgengineTransaction:
        if self._parent is not None:
            return self._parent
        await self.begin()
        self.context = self.engine.current_transaction.set(self)
        return self

    async def __aexit__(self, exception_type, exception, traceback) -> bool:
        if self._parent:
            return exception is None
        try:
            if exception is not None:
                if not self._rolled_back and not self._committed:
                    try:
                        await self.rollback()
                    except Exception:
                        pass  # the body's exception is the one to see
            elif not self._committed and not self._rolled_back:
                await self.commit()
        finally:
            self.engine.current_transaction.reset(self.context)
        return False

    async def begin(self):
        self.native = await (await self.engine.native()).begin()

    async def commit(self):
        try:
            await self.native.commit()
        finally:
            self._committed = True

    async def rollback(self):
        try:
            await self.native.rollback()
        finally:
            self._rolled_back = True

    async def rollback_to(self, savepoint_name: str):
        validate_savepoint_name(savepoint_name)
        await self.native.rollback_to(savepoint_name)

    def get_savepoint_id(self) -> int:
        self._savepoint_id += 1
        return self._savepoint_id

    async def savepoint(self, name: Optional[str] = None) -> PgengineSavepoint:
        name = name or f"savepoint_{self.get_savepoint_id()}"
        validate_savepoint_name(name)
        native = await self.native.savepoint(name)
        return PgengineSavepoint(name=name, transaction=self, native=native)


###############################################################################


class PgengineAtomic(BaseAtomic):
    """Piccolo's ``Atomic``: queries added with ``add`` run in one transaction, their
    statements sent back to back (pipelined) rather than one round trip each.
    ``Create``/``GetOrCreate`` run in order between them."""

    __slots__ = ("engine", "queries")

    def __init__(self, engine: PgenginePostgresEngine):
        self.engine = engine
        self.queries: list[Union[Query, DDL]] = []

    def add(self, *query: Union[Query, DDL]):
        self.queries += list(query)

    def _statements(self, query) -> Optional[list[tuple[str, list]]]:
        """The query's statements, or None when it must run on its own."""
        if isinstance(query, DDL):
            return [(ddl, []) for ddl in query.ddl]
        if isinstance(query, Query):
            query._validate()
            return [
                querystring.compile_string(engine_type="postgres")
                for querystring in query.querystrings
            ]
        from piccolo.query.methods.objects import Create, GetOrCreate

        if isinstance(query, (Create, GetOrCreate)):
            return None
        raise ValueError("Unrecognised query")

    async def run(self):
        queries, self.queries = self.queries, []
        plan = [(query, self._statements(query)) for query in queries]
        if self.engine.log_queries:
            for query, _ in plan:
                self.engine.print_query(
                    query_id=self.engine.get_query_id(), query=str(query)
                )
        if not self.engine.transaction_exists() and all(s is not None for _, s in plan):
            # One pipelined bundle, in its own transaction.
            statements = [s for _, group in plan for s in group]
            await (await self.engine.native()).execute_many(statements)
            return
        async with self.engine.transaction() as transaction:
            pending: list = []
            for query, statements in plan:
                if statements is None:
                    await transaction.native.execute_many(pending)
                    pending = []
                    await query.run()
                else:
                    pending += statements
            await transaction.native.execute_many(pending)

    def run_sync(self):
        return run_sync(self.run())

    def __await__(self):
        return self.run().__await__()


###############################################################################


class PgengineBatch(BaseBatch):
    """Piccolo's ``AsyncBatch``: rows ``batch_size`` at a time, inside the current
    transaction when there is one. Errors are raised, never swallowed."""

    def __init__(self, engine: PgenginePostgresEngine, query: Query, batch_size: int):
        self.engine = engine
        self.query = query
        self.batch_size = batch_size
        self._native = None

    async def _open(self):
        querystring = self.query.querystrings[0]
        sql, args = querystring.compile_string(engine_type="postgres")
        transaction = self.engine.current_transaction.get()
        source = transaction.native if transaction else await self.engine.native()
        self._native = await source.batch(sql, args, self.batch_size)

    async def next(self) -> list[dict]:
        if self._native is None:
            await self._open()
        rows = await self._native.next()
        if rows is None:
            return []
        return await self.query._process_results(rows)

    def __aiter__(self) -> PgengineBatch:
        return self

    async def __anext__(self) -> list[dict]:
        response = await self.next()
        if response == []:
            raise StopAsyncIteration()
        return response

    async def __aenter__(self) -> PgengineBatch:
        await self._open()
        return self

    async def __aexit__(self, exception_type, exception, traceback) -> bool:
        if self._native is not None:
            await self._native.close()
        return False
