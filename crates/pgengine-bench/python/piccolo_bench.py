"""Piccolo ORM side of the pgengine benchmark: its PostgresEngine on asyncpg, or
pgengine-piccolo's PgenginePostgresEngine (`--engine pgengine`), the same code else;
and asyncpg alone (`--engine asyncpg-executemany`) for bulk inserts with its
`Connection.executemany`.

Run by the Rust bench binary once per workload and repetition; it prints one
JSON line on stdout with the measured figures. Every loop is bounded in time
and in count, like the Rust side's.

    python piccolo_bench.py --url URL --workload point_select --concurrency 32 \
        --duration 3 --warmup 0.5 --accounts 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time

from piccolo.engine.postgres import PostgresEngine
from piccolo.table import Table

MAX_OPS_PER_WORKER = 10_000_000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument(
        "--workload",
        required=True,
        choices=["point_select", "tpcb", "atomic", "empty_tx", "bulk_insert", "batch"],
    )
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--accounts", type=int, default=1_000_000)
    p.add_argument("--atomic-size", type=int, default=100)
    p.add_argument("--bulk-rows", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--table", default="bench_stream")
    p.add_argument(
        "--engine",
        choices=["asyncpg", "pgengine", "asyncpg-executemany"],
        default="asyncpg",
    )
    return p.parse_args()


def make_engine(args) -> PostgresEngine:
    """Piccolo's engine on asyncpg, or the drop-in on pgengine."""
    if args.engine == "pgengine":
        from pgengine_piccolo import PgenginePostgresEngine

        return PgenginePostgresEngine(config={"dsn": args.url})
    return PostgresEngine(config={"dsn": args.url})


def make_table(engine: PostgresEngine) -> type[Table]:
    """A table class bound to `engine`, used only for `Table.raw` queries."""

    class PgbenchAccounts(Table, db=engine):
        pass

    return PgbenchAccounts


async def point_select(t: type[Table], engine, args) -> None:
    aid = random.randint(1, args.accounts)
    await t.raw("SELECT abalance FROM pgbench_accounts WHERE aid = {}", aid)


async def tpcb(t: type[Table], engine, args) -> None:
    scale = max(1, args.accounts // 100_000)
    aid = random.randint(1, args.accounts)
    bid = random.randint(1, scale)
    tid = random.randint(1, 10 * scale)
    delta = random.randint(-5000, 5000)
    async with engine.transaction():
        await t.raw(
            "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {}",
            delta,
            aid,
        )
        await t.raw("SELECT abalance FROM pgbench_accounts WHERE aid = {}", aid)
        await t.raw(
            "UPDATE pgbench_tellers SET tbalance = tbalance + {} WHERE tid = {}",
            delta,
            tid,
        )
        await t.raw(
            "UPDATE pgbench_branches SET bbalance = bbalance + {} WHERE bid = {}",
            delta,
            bid,
        )
        await t.raw(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            "VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP)",
            tid,
            bid,
            aid,
            delta,
        )


async def atomic(t: type[Table], engine, args) -> None:
    bundle = engine.atomic()
    for i in range(args.atomic_size):
        bundle.add(t.raw("INSERT INTO bench_atomic (a, b) VALUES ({}, {})", i, "x"))
    await bundle.run()


async def empty_tx(t: type[Table], engine, args) -> None:
    async with engine.transaction():
        pass


async def bulk_insert(pool, _engine, args) -> None:
    """`bulk_rows` rows in one `executemany`: one prepared statement, a Bind/Execute
    per row and one Sync, atomic (asyncpg >= 0.22)."""
    async with pool.acquire() as con:
        await con.executemany(
            "INSERT INTO bench_bulk (a, b) VALUES ($1, $2)", args.rows
        )


OPS = {
    "point_select": point_select,
    "tpcb": tpcb,
    "atomic": atomic,
    "empty_tx": empty_tx,
    "bulk_insert": bulk_insert,
}


async def closed_loop(args) -> dict:
    """`concurrency` tasks run the op back to back; ops that start during the
    warmup are not counted."""
    if args.engine == "asyncpg-executemany":
        import asyncpg

        args.rows = [(i, "x") for i in range(args.bulk_rows)]
        pool = await asyncpg.create_pool(
            args.url, min_size=args.concurrency, max_size=args.concurrency
        )
        engine, t, close = None, pool, pool.close
    else:
        engine = make_engine(args)
        await engine.start_connection_pool(
            min_size=args.concurrency, max_size=args.concurrency
        )
        t, close = make_table(engine), engine.close_connection_pool
    op = OPS[args.workload]
    latencies: list[float] = []
    # Wall-clock span of the counted ops (the Rust side's proxy counts round
    # trips within it).
    span = [float("inf"), 0.0]
    start = time.perf_counter()
    measure_from = start + args.warmup
    end = measure_from + args.duration

    async def worker() -> None:
        for _ in range(MAX_OPS_PER_WORKER):
            began = time.perf_counter()
            if began >= end:
                return
            wall_began = time.time()
            await op(t, engine, args)
            if began >= measure_from:
                latencies.append(time.perf_counter() - began)
                span[0] = min(span[0], wall_began)
                span[1] = max(span[1], time.time())

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finished = time.perf_counter()
    await close()
    latencies.sort()
    n = len(latencies)
    return {
        "ops": n,
        "secs": finished - measure_from,
        "p50_us": latencies[n // 2] * 1e6 if n else None,
        "p99_us": latencies[min(n - 1, n * 99 // 100)] * 1e6 if n else None,
        "window_start_unix": span[0] if n else None,
        "window_end_unix": span[1] if n else None,
    }


async def batch(args) -> dict:
    """Streams the whole table with `engine.batch` (a server-side cursor)."""
    engine = make_engine(args)
    t = make_table(engine)
    query = t.raw(f"SELECT id, label, created, amount FROM {args.table}")
    rows = 0
    began = time.perf_counter()
    async with await engine.batch(query, batch_size=args.batch_size) as stream:
        async for chunk in stream:
            rows += len(chunk)
    secs = time.perf_counter() - began
    return {
        "rows": rows,
        "secs": secs,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main() -> None:
    args = parse_args()
    if args.workload == "batch":
        result = asyncio.run(batch(args))
    else:
        result = asyncio.run(closed_loop(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
