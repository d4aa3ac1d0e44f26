"""A drop-in Piccolo ORM engine backed by pgengine (Rust).

In ``piccolo_conf.py``, the only change::

    from pgengine_piccolo import PgenginePostgresEngine

    DB = PgenginePostgresEngine(config={"host": "localhost", "database": "app"})
"""

from .engine import (
    PgengineAtomic,
    PgengineBatch,
    PgenginePostgresEngine,
    PgengineSavepoint,
    PgengineTransaction,
)

__all__ = [
    "PgengineAtomic",
    "PgengineBatch",
    "PgenginePostgresEngine",
    "PgengineSavepoint",
    "PgengineTransaction",
]
