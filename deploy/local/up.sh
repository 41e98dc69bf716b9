#!/usr/bin/env bash
# Start the distributed deployment on this machine, on loopback only:
#   a throw-away PostgreSQL cluster (Debian's initdb + pg_ctl) holding the Dagster instance,
#   a Dask scheduler and FI_WORKERS (default 2) Dask workers that execute the steps,
#   the Dagster daemon (queue, sensors, backfills, run monitoring) and the webserver.
# Usage: deploy/local/up.sh [STATE_DIR]   (default .deploy/ in the project; stop with deploy/local/down.sh)
# Settings from the environment: FI_CONFIG (the project file; default fineinstructions.yaml), FI_WORKERS,
# FI_WEB_PORT (default 3000), VENV (default .venv), PG_BIN (default: the newest /usr/lib/postgresql/*/bin).
# What it started is written to STATE_DIR/env.sh (source it to talk to the same instance), STATE_DIR/pids/
# and STATE_DIR/logs/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=$(mkdir -p "${1:-$ROOT/.deploy}" && cd "${1:-$ROOT/.deploy}" && pwd)
VENV=${VENV:-$ROOT/.venv}
WORKERS=${FI_WORKERS:-2}
CONFIG=$(realpath -m "${FI_CONFIG:-$ROOT/fineinstructions.yaml}")
PY="$VENV/bin/python"

STARTED=""
# On a failure, stop what was started already (PostgreSQL, services) before exiting.
die() { echo "up.sh: $*" >&2; [ -n "$STARTED" ] && "$HERE/down.sh" "$STATE" >&2; exit 1; }
[ -x "$PY" ] || die "no Python environment at $VENV (run 'make install' first, or set VENV)"
"$PY" -c "import dagster_postgres, distributed" 2>/dev/null \
  || die "the deployment needs dagster-postgres and distributed: $VENV/bin/pip install -e '.[deploy]'"
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}
[ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] \
  || die "no PostgreSQL server binaries (initdb, pg_ctl) under '${PG_BIN}': apt-get install postgresql"
[ -f "$CONFIG" ] || die "no project config at $CONFIG (set FI_CONFIG)"
[ -e "$STATE/pids/webserver.pid" ] && die "$STATE already runs a deployment: deploy/local/down.sh $STATE"
mkdir -p "$STATE/logs" "$STATE/pids"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port)
DASK_PORT=$(free_port)
WEB_PORT=${FI_WEB_PORT:-3000}

# PostgreSQL refuses to run as root: then the cluster belongs to the `postgres` user and lives where that
# user can reach it.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then
  PGDATA=$(mktemp -d /tmp/fineinstructions-pg.XXXXXX)
  chown postgres: "$PGDATA"
else
  PGDATA="$STATE/postgres"
  mkdir -p "$PGDATA"
fi
echo "$PGDATA" > "$STATE/pgdata"
echo "$PG_BIN" > "$STATE/pgbin"
STARTED=1
as_pg "$PG_BIN/initdb" -D "$PGDATA" -A trust -U dagster --no-instructions > "$STATE/logs/initdb.log" 2>&1 \
  || die "initdb failed: $(tail -n 5 "$STATE/logs/initdb.log")"
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -w -t 60 -l "$PGDATA/server.log" \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" start > "$STATE/logs/pg_ctl.log" 2>&1 \
  || die "PostgreSQL did not start: $(tail -n 5 "$PGDATA/server.log" 2>/dev/null)"
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U dagster dagster \
  || die "could not create the database 'dagster' on 127.0.0.1:$PG_PORT"

export DAGSTER_HOME="$STATE/dagster_home"
mkdir -p "$DAGSTER_HOME"
cp "$HERE/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
cat > "$STATE/env.sh" <<ENV
export DAGSTER_HOME=$DAGSTER_HOME
export FI_CONFIG=$CONFIG
export FI_PG_PORT=$PG_PORT
export FI_DASK_SCHEDULER=tcp://127.0.0.1:$DASK_PORT
export FI_EXECUTOR=dask
export FI_EXECUTOR_CONFIG=$HERE/dask_executor.yaml
export FI_WEB_URL=http://127.0.0.1:$WEB_PORT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ENV
# shellcheck source=/dev/null
. "$STATE/env.sh"
export FI_AUTOMATION=${FI_AUTOMATION:-on}

# Each service in a session of its own (its pid is its process group), from the project root.
start() {
  local name=$1; shift
  (cd "$ROOT" && exec setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null) &
  echo $! > "$STATE/pids/$name.pid"
}
start scheduler "$VENV/bin/dask" scheduler --host 127.0.0.1 --port "$DASK_PORT" --no-dashboard --no-show
for i in $(seq 1 "$WORKERS"); do
  # One thread each: Dagster steps are not run two at a time in one process.
  start "worker-$i" "$VENV/bin/dask" worker "$FI_DASK_SCHEDULER" --name "worker-$i" --host 127.0.0.1 \
    --nthreads 1 --nworkers 1 --no-dashboard --death-timeout 60
done
start daemon "$VENV/bin/dagster-daemon" run -w "$ROOT/workspace.yaml"
start webserver "$VENV/bin/dagster-webserver" -w "$ROOT/workspace.yaml" -h 127.0.0.1 -p "$WEB_PORT"

"$PY" - "$FI_DASK_SCHEDULER" "$WORKERS" "$FI_WEB_URL" "$STATE" <<'PYEOF' || die "the services did not come up (logs: $STATE/logs)"
import sys, time, urllib.request
from pathlib import Path
from distributed import Client
address, workers, url, state = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
def ended():
    for pid_file in (state / "pids").glob("*.pid"):
        if not Path(f"/proc/{pid_file.read_text().strip()}").exists():
            log = state / "logs" / f"{pid_file.stem}.log"
            sys.exit(f"up.sh: {pid_file.stem} exited: {log.read_text(errors='replace')[-2000:]}")
deadline = time.monotonic() + 300
with Client(address, timeout=120) as client:
    while len(client.scheduler_info()["workers"]) < workers:
        ended()
        if time.monotonic() > deadline:
            sys.exit(f"up.sh: fewer than {workers} Dask workers joined {address}")
        time.sleep(0.5)
while True:
    ended()
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"up.sh: the webserver did not answer at {url}")
    time.sleep(1)
PYEOF
echo "deployment up: UI $FI_WEB_URL, PostgreSQL 127.0.0.1:$PG_PORT, Dask scheduler $FI_DASK_SCHEDULER with $WORKERS workers"
echo "state, logs and pids under $STATE; to use this instance: . $STATE/env.sh; to stop: deploy/local/down.sh $STATE"
