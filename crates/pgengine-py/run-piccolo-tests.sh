#!/usr/bin/env bash
# Runs Piccolo's own test suite against PgenginePostgresEngine, on an ephemeral cluster.
#
#   crates/pgengine-py/run-piccolo-tests.sh PICCOLO_CHECKOUT [pytest args, e.g. tests/engine tests/table]
#
# PICCOLO_CHECKOUT is a clone of Piccolo's repository (its tests/ are not on PyPI). The
# script copies its tests/ to a temp dir, adds a conf module that swaps in
# PgenginePostgresEngine (the one-line change a user makes), and lets tests/base.py's
# "running on Postgres" check accept a subclass (`isinstance`, not `type(...) is`). Needs
# the venv of .ci/run (target/python-venv, with the package built) plus python-dateutil.
# PICCOLO_CONF=tests.postgres_conf runs the same tests on Piccolo's own engine (asyncpg),
# for a baseline.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
checkout=${1:?usage: $0 PICCOLO_CHECKOUT [pytest args]}
shift
python="$repo/target/python-venv/bin/python"
work=$(mktemp -d /tmp/piccolo-suite.XXXXXX)
trap 'rm -rf "$work"' EXIT

cp -r "$checkout/tests" "$work/tests"
sed -i 's/type(ENGINE) is PostgresEngine/isinstance(ENGINE, PostgresEngine)/' "$work/tests/base.py"
sed -e 's/from piccolo.engine.postgres import PostgresEngine/from pgengine_piccolo import PgenginePostgresEngine as PostgresEngine/' \
  "$checkout/tests/postgres_conf.py" >"$work/tests/pgengine_conf.py"

(cd "$repo" && cargo build --quiet -p pgengine-testing --bin pgengine-ephemeral)
coproc PG { "${CARGO_TARGET_DIR:-$repo/target}/debug/pgengine-ephemeral"; }
read -r url <&"${PG[0]}"
port=$(echo "$url" | sed -E 's/.*:([0-9]+)\/.*/\1/')
"$python" -c "
import asyncio, asyncpg
async def main():
    connection = await asyncpg.connect('$url')
    await connection.execute('CREATE DATABASE piccolo')
    await connection.close()
asyncio.run(main())"

cd "$work"
status=0
PICCOLO_CONF=${PICCOLO_CONF:-tests.pgengine_conf} PG_HOST=localhost PG_PORT=$port \
  "$python" -m pytest -q -p no:cacheprovider "${@:-tests}" || status=$?
exec {PG[1]}>&-   # closing its stdin stops the cluster
wait
exit $status
