"""Real PostgreSQL for the pytest suite.

With DATABASE_URL set, the tests use a fresh database on that server (dropped at the
end). Otherwise they start an ephemeral cluster with pgengine-testing's
`pgengine-ephemeral` binary (built with cargo if needed; PGENGINE_EPHEMERAL names another
path), which stops it, files and all, when the session ends (its stdin closes).

The tests' `piccolo_conf.py` points Piccolo at `PgenginePostgresEngine` on that database,
as a user's project would.
"""

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(Path(__file__).resolve().parent))

_cluster = None
_dropped_database = None


def _ephemeral_binary() -> str:
    path = os.environ.get("PGENGINE_EPHEMERAL")
    if path:
        return path
    subprocess.run(
        ["cargo", "build", "--quiet", "-p", "pgengine-testing", "--bin", "pgengine-ephemeral"],
        cwd=REPO,
        check=True,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "pgengine-ephemeral")


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def pytest_configure(config):
    global _cluster, _dropped_database
    url = os.environ.get("DATABASE_URL")
    if url:
        name = f"pgengine_py_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(url, f'CREATE DATABASE "{name}"'))
        _dropped_database = (url, name)
        base, _, _ = url.rpartition("/")
        os.environ["PGENGINE_TEST_URL"] = f"{base}/{name}"
    else:
        _cluster = subprocess.Popen(
            [_ephemeral_binary()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = _cluster.stdout.readline().strip()
        if not line:
            raise RuntimeError("pgengine-ephemeral did not start a cluster")
        os.environ["PGENGINE_TEST_URL"] = line


def pytest_unconfigure(config):
    if _dropped_database:
        url, name = _dropped_database
        asyncio.run(_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    if _cluster is not None:
        _cluster.stdin.close()
        _cluster.wait(timeout=60)
        _cluster.stdout.close()


@pytest.fixture
def url() -> str:
    return os.environ["PGENGINE_TEST_URL"]


@pytest.fixture
def tables():
    """Fresh, empty tables for one test."""
    from tables import create_tables, drop_tables

    create_tables()
    yield
    drop_tables()


@pytest.fixture
def db():
    from piccolo_conf import DB

    return DB
