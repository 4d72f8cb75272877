#!/usr/bin/env bash
# Runs ONE component of the local fleet in the foreground, as Tilt's `local_resource`
# serve_cmd needs (`tilt up -- --mode=local`): Tilt owns the process, shows its output,
# restarts it, and stops it with SIGTERM to its process group. The state folder, ports,
# flags and environment variables are infra/local/up.sh's, so both use the same data
# (one at a time: each refuses a port that is taken).
#
#   infra/local/serve.sh COMPONENT          run it in the foreground
#   infra/local/serve.sh --ready COMPONENT  exit 0 once it accepts connections, 1 until then
#                                           (Tilt's readiness probe; pg_isready for PostgreSQL)
#
# An unknown COMPONENT exits 2.
#
# COMPONENT: etcd | redis | pg-shard-N | pg-shard-N-replica (N: 0 or 1) | shard-router |
#            cache | conversation | analytics
#
# Each shard has one streaming replica (replica 0 of up.sh's layout). The services run the
# binaries that `cargo build --profile $CONVOY_BUILD_PROFILE` (default release, as up.sh)
# left in the target folder; the Tiltfile's `build` resource builds them.
#
# Environment: up.sh's (CONVOY_STATE_DIR, CONVOY_PG_PORT_BASE, CONVOY_ETCD_PORT,
# CONVOY_REDIS_PORT, CONVOY_LISTEN, CONVOY_CACHE_LISTEN, CONVOY_ROUTER_LISTEN,
# CONVOY_ANALYTICS_LISTEN, CONVOY_*_METRICS_LISTEN, CONVOY_BUILD_PROFILE, CONVOY_PG_BIN),
# with the same defaults.
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CONVOY_ROOT"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ready=0
if [[ "${1:-}" == --ready ]]; then
    ready=1
    shift
fi
if (($# != 1)) || [[ "$1" == -h || "$1" == --help ]]; then
    usage >&2
    exit 2
fi
component="$1"

# up.sh's defaults.
STATE_DIR="${CONVOY_STATE_DIR:-$CONVOY_ROOT/.convoy}"
PORT_BASE="${CONVOY_PG_PORT_BASE:-25432}"
ETCD_PORT="${CONVOY_ETCD_PORT:-22379}"
REDIS_PORT="${CONVOY_REDIS_PORT:-23379}"
LISTEN="${CONVOY_LISTEN:-127.0.0.1:20051}"
CACHE_LISTEN="${CONVOY_CACHE_LISTEN:-127.0.0.1:20061}"
ROUTER_LISTEN="${CONVOY_ROUTER_LISTEN:-127.0.0.1:20071}"
ANALYTICS_LISTEN="${CONVOY_ANALYTICS_LISTEN:-127.0.0.1:20081}"
METRICS_LISTEN="${CONVOY_CONVERSATION_METRICS_LISTEN:-127.0.0.1:9151}"
CACHE_METRICS_LISTEN="${CONVOY_CACHE_METRICS_LISTEN:-127.0.0.1:9161}"
ROUTER_METRICS_LISTEN="${CONVOY_ROUTER_METRICS_LISTEN:-127.0.0.1:9171}"
ANALYTICS_METRICS_LISTEN="${CONVOY_ANALYTICS_METRICS_LISTEN:-127.0.0.1:9181}"
PROFILE="${CONVOY_BUILD_PROFILE:-release}"
for port in "$PORT_BASE" "$ETCD_PORT" "$REDIS_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || die "CONVOY_PG_PORT_BASE, CONVOY_ETCD_PORT and CONVOY_REDIS_PORT must be port numbers, got '$port'"
done
ETCD_URL="http://127.0.0.1:$ETCD_PORT"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
SHARDS=2

shard_port() { printf '%s\n' "$((PORT_BASE + $1))"; }
replica_port() { printf '%s\n' "$((PORT_BASE + 100 + 10 * $1))"; }

# The file that says COMPONENT (PostgreSQL) is served in the foreground: it is ready only
# then, not while pg_start's server (stopped at once) is up.
serving_marker() { printf '%s/run/%s.serving\n' "$STATE_DIR" "$1"; }

# The shard number in pg-shard-N or pg-shard-N-replica.
shard_of() {
    local n="${1#pg-shard-}"
    printf '%s\n' "${n%-replica}"
}

case "$component" in
etcd | redis | pg-shard-[01] | pg-shard-[01]-replica | shard-router | cache | conversation | analytics) ;;
*)
    usage >&2
    log "unknown component: $component"
    exit 2
    ;;
esac

# "HOST PORT" where COMPONENT accepts connections.
address_of() {
    case "$1" in
    etcd) echo "127.0.0.1 $ETCD_PORT" ;;
    redis) echo "127.0.0.1 $REDIS_PORT" ;;
    pg-shard-[01]) echo "127.0.0.1 $(shard_port "$(shard_of "$1")")" ;;
    pg-shard-[01]-replica) echo "127.0.0.1 $(replica_port "$(shard_of "$1")")" ;;
    conversation) host_port_of "$LISTEN" ;;
    cache) host_port_of "$CACHE_LISTEN" ;;
    shard-router) host_port_of "$ROUTER_LISTEN" ;;
    analytics) host_port_of "$ANALYTICS_LISTEN" ;;
    esac
}

if ((ready)); then
    read -r host port < <(address_of "$component")
    case "$component" in
    # The port opens before PostgreSQL accepts sessions (startup, a standby's recovery).
    pg-*)
        [[ -f "$(serving_marker "$component")" ]] || exit 1
        pg_run pg_isready -q -h "$host" -p "$port" -U postgres || exit 1
        ;;
    *) tcp_open "$host" "$port" || exit 1 ;;
    esac
    exit 0
fi

mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
LOG_DIR="$STATE_DIR/logs"

# A service binary of the build, by package name.
binary() {
    local sub="$PROFILE" path
    case "$PROFILE" in dev | debug) sub=debug ;; esac
    path="${CARGO_TARGET_DIR:-$CONVOY_ROOT/target}/$sub/$1"
    [[ -x "$path" ]] || die "$path is not built (the Tiltfile's build resource builds it; CONVOY_BUILD_PROFILE picks the profile)"
    printf '%s\n' "$path"
}

# serve_pg SHARD [replica]: the shard's primary or its replica, as this process's child.
serve_pg() {
    local shard="$1" role="${2:-primary}" pg_root data port name pg_log_dir marker
    marker="$(serving_marker "$component")"
    mkdir -p "$(dirname "$marker")"
    rm -f "$marker"
    pg_root="$(pg_root_for "$STATE_DIR")"
    pg_owned_dir "$pg_root"
    if [[ "$role" == replica ]]; then
        data="$pg_root/shard-$shard-replica-0"
        port="$(replica_port "$shard")"
        name="pg-shard-$shard-replica-0"
    else
        data="$pg_root/shard-$shard"
        port="$(shard_port "$shard")"
        name="pg-shard-$shard"
    fi
    if pg_running "$data"; then
        die "$data is already served by another process (a fleet of infra/local/up.sh? stop it with infra/local/up.sh --stop)"
    fi
    # As up.sh: the start-up log goes next to the data when the postgres user cannot reach LOG_DIR.
    mkdir -p "$LOG_DIR"
    pg_log_dir="$LOG_DIR"
    if ! pg_can_enter "$LOG_DIR"; then
        pg_log_dir="$pg_root/logs"
        pg_owned_dir "$pg_log_dir"
        ln -sfn "$pg_log_dir/$name.log" "$LOG_DIR/$name.log"
    fi
    if [[ "$role" == replica ]]; then
        pg_init_replica "$data" "$(shard_port "$shard")"
    else
        pg_init "$data"
    fi
    # pg_start writes the per-start settings (port, sockets, preloads) and creates database
    # convoy, but its pg_ctl detaches the server from this process; so stop it and serve the
    # same cluster again as a child that Tilt owns (and whose log Tilt shows).
    pg_start "$data" "$port" "$pg_log_dir/$name.log"
    pg_stop "$data"
    log "serving $data on 127.0.0.1:$port in the foreground"
    pg_run postgres -D "$data" &
    local pid=$!
    # Tilt's SIGTERM alone asks for a smart shutdown, which waits for every client to leave
    # (the services' pools never do); a fast one ends their sessions and exits at once. (As
    # root, as_pg's runuser also SIGKILLs postgres 2 s after that SIGTERM: a dev cluster's
    # fast shutdown takes far less, and PostgreSQL recovers from a kill anyway.)
    # shellcheck disable=SC2064 # the paths are fixed now
    trap "rm -f '$marker'" EXIT
    # shellcheck disable=SC2064
    trap "rm -f '$marker'; pg_stop '$data'; exit 143" TERM
    # shellcheck disable=SC2064
    trap "rm -f '$marker'; pg_stop '$data'; exit 130" INT
    echo "$pid" >"$marker"
    wait "$pid"
}

# The shard map the shard-router publishes in etcd, as up.sh writes it (one replica a shard).
write_shard_map() {
    local i
    {
        echo "# Written by infra/local/serve.sh at every start of the shard-router."
        echo "epoch = 1"
        for ((i = 0; i < SHARDS; i++)); do
            echo "[[shards]]"
            echo "id = \"shard-$i\""
            echo "primary = \"postgres://postgres@127.0.0.1:$(shard_port "$i")/convoy\""
            echo "replicas = [\"postgres://postgres@127.0.0.1:$(replica_port "$i")/convoy\"]"
            echo "slots = [\"$((i * 1024 / SHARDS))-$(((i + 1) * 1024 / SHARDS - 1))\"]"
        done
    } >"$STATE_DIR/shard-map.toml"
}

# Authorization as up.sh's: the development key pair and tokens of $STATE_DIR/auth unless the
# environment decides (CONVOY_NO_AUTH, or CONVOY_AUTH_KEYS as Tilt's auth resource sets it).
case "$component" in
shard-router | cache | conversation | analytics) dev_auth "$STATE_DIR" "$(binary convoyctl)" ;;
esac

# The ports this component listens on must be free: say who holds one rather than fail later
# with "address already in use" (Postgres's are checked by pg_start).
listen_check() {
    local what="$1" setting="$2" metrics="$3" port
    read -r _ port < <(address_of "$component")
    require_port_free "$port" "$what" "$setting"
    read -r _ port < <(host_port_of "$metrics")
    require_port_free "$port" "$component's metrics" "CONVOY_*_METRICS_LISTEN"
}
case "$component" in
etcd)
    require_port_free "$ETCD_PORT" "etcd's clients" CONVOY_ETCD_PORT
    require_port_free "$((ETCD_PORT + 1))" "etcd's peers" CONVOY_ETCD_PORT
    ;;
redis) require_port_free "$REDIS_PORT" Redis CONVOY_REDIS_PORT ;;
shard-router) listen_check "the shard-router's gRPC" CONVOY_ROUTER_LISTEN "$ROUTER_METRICS_LISTEN" ;;
cache) listen_check "the cache service's gRPC" CONVOY_CACHE_LISTEN "$CACHE_METRICS_LISTEN" ;;
conversation) listen_check "conversation's gRPC" CONVOY_LISTEN "$METRICS_LISTEN" ;;
analytics) listen_check "analytics' gRPC" CONVOY_ANALYTICS_LISTEN "$ANALYTICS_METRICS_LISTEN" ;;
esac

# Flags and unset variables as up.sh's (NO_COLOR aside: Tilt shows colours, a log file does not).
case "$component" in
etcd)
    command -v etcd >/dev/null 2>&1 || die "etcd not found (apt-get install -y etcd-server)"
    mkdir -p "$STATE_DIR/etcd"
    # ETCD_* variables would override the flags below.
    unset_etcd_env=()
    while IFS= read -r name; do unset_etcd_env+=(-u "$name"); done < <(env | grep -o '^ETCD_[A-Z_]*' || true)
    exec env "${unset_etcd_env[@]}" etcd --name convoy-local --data-dir "$STATE_DIR/etcd" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-cluster "convoy-local=http://127.0.0.1:$((ETCD_PORT + 1))"
    ;;
redis)
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found (apt-get install -y redis-server)"
    mkdir -p "$STATE_DIR/redis"
    exec redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE_DIR/redis" \
        --appendonly yes --save ""
    ;;
pg-shard-[01]) serve_pg "$(shard_of "$component")" ;;
pg-shard-[01]-replica) serve_pg "$(shard_of "$component")" replica ;;
shard-router)
    bin="$(binary shard-router)"
    write_shard_map
    exec env -u CONVOY_LISTEN -u CONVOY_SHARD_MAP "$bin" --listen "$ROUTER_LISTEN" \
        --etcd-endpoint "$ETCD_URL" --shard-map "$STATE_DIR/shard-map.toml" --publish-shard-map \
        --metrics-listen "$ROUTER_METRICS_LISTEN"
    ;;
cache)
    bin="$(binary cache)"
    exec env -u CONVOY_LISTEN "$bin" --listen "$CACHE_LISTEN" --redis-url "$REDIS_URL" \
        --etcd-endpoint "$ETCD_URL" --metrics-listen "$CACHE_METRICS_LISTEN"
    ;;
conversation)
    bin="$(binary conversation)"
    # The shard-router published the map in etcd; migrations run at start.
    exec env -u CONVOY_SHARD_MAP -u CONVOY_SHARD_DSNS -u CONVOY_MIGRATE_ONLY -u CONVOY_SHARD_MAP_FROM_ETCD \
        "$bin" --shard-map-from-etcd --listen "$LISTEN" --etcd-endpoint "$ETCD_URL" \
        --redis-url "$REDIS_URL" --metrics-listen "$METRICS_LISTEN"
    ;;
analytics)
    bin="$(binary analytics)"
    exec env -u CONVOY_LISTEN -u CONVOY_SHARD_MAP -u CONVOY_SHARD_DSNS -u CONVOY_METRICS_LISTEN \
        "$bin" --listen "$ANALYTICS_LISTEN" --etcd-endpoint "$ETCD_URL" \
        --shard-map-from-etcd --metrics-listen "$ANALYTICS_METRICS_LISTEN" \
        --prices "${CONVOY_PRICES:-$CONVOY_ROOT/infra/local/prices.toml}"
    ;;
esac
