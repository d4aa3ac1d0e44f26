"""What a user's piccolo_conf.py looks like with pgengine: one changed line."""

import os

from pgengine_piccolo import PgenginePostgresEngine

DB = PgenginePostgresEngine(config={"dsn": os.environ["PGENGINE_TEST_URL"]})
