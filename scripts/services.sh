#!/usr/bin/env bash
# The team services on one host: PostgreSQL, the MLflow server (tracking + registry on PostgreSQL,
# artifacts proxied by the server) and, with `prefect` in AIVOICE_SERVICES, a Prefect server (on the
# same PostgreSQL) with a process work pool and AIVOICE_WORKERS workers.
#
#   scripts/services.sh start | stop | status      (make services / make services-stop)
#
# State (database cluster, artifacts, logs, pid files, ports) lives in $AIVOICE_SERVICES_DIR
# (default: .services/ in the project, gitignored). Ports are chosen free at the first start and kept.
# `start` writes $AIVOICE_SERVICES_DIR/env (`source` it: MLFLOW_TRACKING_URI, PREFECT_API_URL) and prints it.
# PostgreSQL refuses to run as root: as root the cluster is owned and run by the `postgres` system user
# (Debian's package creates it) through runuser; as any other user it runs as that user.
# Only 127.0.0.1 is listened on; the database trusts local connections: authentication is the operator's
# job on a shared host (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$(mkdir -p "${AIVOICE_SERVICES_DIR:-.services}" && cd "${AIVOICE_SERVICES_DIR:-.services}" && pwd)
SERVICES=${AIVOICE_SERVICES:-postgres mlflow prefect}
WORKERS=${AIVOICE_WORKERS:-2}
POOL=${AIVOICE_POOL:-aivoice-process}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
BIN=${AIVOICE_BIN:-$ROOT/.venv/bin}
PY=$BIN/python

die() { echo "services: $*" >&2; exit 1; }
has() { [[ " $SERVICES " == *" $1 "* ]]; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_of() {   # the port recorded for a service, chosen free the first time
    local f="$DIR/$1.port"
    [[ -s $f ]] || free_port >"$f"
    cat "$f"
}
alive() { [[ -s "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
as_pg() { if [[ $(id -u) = 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
wait_http() {   # url name timeout_s
    local deadline=$((SECONDS + $3))
    until "$PY" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$1', timeout=2).status != 200)" 2>/dev/null; do
        alive "$2" || die "$2 exited; its log: $DIR/$2.log$(echo; tail -20 "$DIR/$2.log")"
        (( SECONDS < deadline )) || die "$2 not healthy after $3 s; its log: $DIR/$2.log"
        sleep 1
    done
}
daemon() {   # name command... : start detached in its own session, pid to $DIR/name.pid
    local name=$1; shift
    setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
    echo $! >"$DIR/$name.pid"
}

start_postgres() {
    [[ -x $PG_BIN/pg_ctl ]] || die "PostgreSQL binaries not found (PG_BIN=$PG_BIN); install Debian's postgresql (make system-deps)"
    local data=$DIR/pgdata port; port=$(port_of postgres)
    if [[ $(id -u) = 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' system user (Debian's postgresql package creates it)"
        chmod o+x "$DIR"   # the postgres user must reach its cluster folder
        runuser -u postgres -- test -x "$DIR" || die "user postgres cannot reach $DIR: every parent folder needs o+x"
    fi
    if [[ ! -s $data/PG_VERSION ]]; then
        mkdir -p "$data"; [[ $(id -u) = 0 ]] && chown postgres: "$data"
        as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
            || die "initdb failed: $DIR/initdb.log"
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $data" start >/dev/null \
            || die "PostgreSQL did not start: $data/server.log"
    fi
    local psql=("$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -tAq)
    for db in mlflow prefect; do
        [[ $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$db'") = 1 ]] \
            || "${psql[@]}" -c "CREATE DATABASE $db" || die "could not create database $db"
    done
}

start_mlflow() {
    alive mlflow && return
    local port pg; port=$(port_of mlflow); pg=$(port_of postgres)
    mkdir -p "$DIR/mlflow-artifacts"
    daemon mlflow "$BIN/mlflow" server --backend-store-uri "postgresql://postgres@127.0.0.1:$pg/mlflow" \
        --serve-artifacts --artifacts-destination "$DIR/mlflow-artifacts" \
        --host 127.0.0.1 --port "$port" --workers "${AIVOICE_MLFLOW_WORKERS:-2}"
    wait_http "http://127.0.0.1:$port/health" mlflow 120
}

start_prefect() {
    local port pg; port=$(port_of prefect); pg=$(port_of postgres)
    export PREFECT_HOME=$DIR/prefect-home PREFECT_API_URL=http://127.0.0.1:$port/api
    export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=${PREFECT_UI_ENABLED:-false}
    if ! alive prefect; then
        PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:$pg/prefect" \
            daemon prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$port"
    fi
    wait_http "$PREFECT_API_URL/health" prefect 120
    "$PY" -c "from flows.deploy import ensure_crash_automation, ensure_work_pool; ensure_work_pool('$POOL'); ensure_crash_automation()" \
        || die "could not create work pool $POOL or the crash automation"
    for i in $(seq 1 "$WORKERS"); do
        alive "worker-$i" && continue
        PATH=$BIN:$PATH daemon "worker-$i" "$BIN/prefect" worker start --pool "$POOL" --type process --name "$(hostname)-$i"
    done
}

write_env() {
    { has mlflow && echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(port_of mlflow)"
      has prefect && echo "export PREFECT_API_URL=http://127.0.0.1:$(port_of prefect)/api"
      echo "export AIVOICE_SERVICES_DIR=$DIR"; } >"$DIR/env"
}

stop_one() {   # name: SIGTERM its process group, SIGKILL after 20 s
    local name=$1 pid
    alive "$name" || { rm -f "$DIR/$name.pid"; return 0; }
    pid=$(cat "$DIR/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
    rm -f "$DIR/$name.pid"
}

case ${1:-} in
    start)
        has postgres && start_postgres
        has mlflow && start_mlflow
        has prefect && start_prefect
        write_env
        echo "services running (state in $DIR); for clients:"
        sed 's/^/  /' "$DIR/env"
        echo "  (source $DIR/env)"
        ;;
    stop)
        for f in "$DIR"/worker-*.pid; do [[ -e $f ]] && stop_one "$(basename "$f" .pid)"; done
        stop_one prefect; stop_one mlflow
        if [[ -s $DIR/pgdata/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" status >/dev/null 2>&1; then
            as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m fast -w stop >/dev/null
        fi
        echo "services stopped (state kept in $DIR)"
        ;;
    status)
        for f in "$DIR"/*.pid; do [[ -e $f ]] || continue; n=$(basename "$f" .pid)
            echo "$n: $(alive "$n" && echo "running (pid $(cat "$f"))" || echo stopped)"; done
        [[ -s $DIR/pgdata/PG_VERSION ]] && echo "postgres: $(as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" status >/dev/null 2>&1 && echo running || echo stopped)"
        [[ -f $DIR/env ]] && cat "$DIR/env"
        ;;
    *) die "usage: $0 start|stop|status" ;;
esac
