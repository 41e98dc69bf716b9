#!/usr/bin/env bash
# Stop what deploy/local/up.sh started (webserver, daemon, Dask workers and scheduler, PostgreSQL) and
# delete the throw-away PostgreSQL cluster. The data directory (lake, catalog, request cache) is kept.
# Usage: deploy/local/down.sh [STATE_DIR]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=${1:-$ROOT/.deploy}
[ -d "$STATE" ] || { echo "down.sh: no deployment state at $STATE" >&2; exit 1; }
stop_group() {  # SIGTERM to the service's process group, SIGKILL after 15 s
  local pid=$1
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  for _ in $(seq 1 30); do kill -0 -- "-$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
}
for name in webserver daemon $(cd "$STATE/pids" 2>/dev/null && ls worker-*.pid 2>/dev/null | sed 's/\.pid$//') scheduler; do
  f="$STATE/pids/$name.pid"
  [ -f "$f" ] && stop_group "$(cat "$f")" && rm -f "$f"
done
if [ -f "$STATE/pgdata" ]; then
  PGDATA=$(cat "$STATE/pgdata")
  PG_BIN=$(cat "$STATE/pgbin" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -d "$PGDATA" ]; then
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    else "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; fi
    rm -rf "$PGDATA"
  fi
  rm -f "$STATE/pgdata" "$STATE/pgbin"
fi
echo "deployment at $STATE stopped"
