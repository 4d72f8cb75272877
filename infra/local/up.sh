#!/usr/bin/env bash
# Starts the convoy fleet on this machine, for real: etcd (discovery), Redis (the cache
# tier's store and invalidation bus), two PostgreSQL shards with a streaming replica each
# (reads go to replicas; reads with a write's token only to ones that replayed it), the
# conversation service
# (relaying its outbox to Redis), the cache service, the shard-router (the shard map
# in etcd, node health and lag) and the analytics service (aggregates over both shards,
# cached in the cache tier), all registered in etcd, with
# persistent data under .convoy/.
#
#   infra/local/up.sh             build, start, stay in the foreground; Ctrl-C stops it all
#   infra/local/up.sh --detach    (or -d) start in the background and return
#   infra/local/up.sh --status    say what is running
#   infra/local/up.sh --stop      stop a detached fleet
#   infra/local/up.sh --reset     stop it and delete its PostgreSQL data (and logs)
#
# Environment:
#   CONVOY_BUILD_PROFILE  cargo profile to build: release (default), dev, or any custom one
#   CONVOY_PG_PORT_BASE   shard-0's port; shard-1 gets the next one (default 25432); shard N's
#                         replica R listens on base + 100 + 10N + R
#   CONVOY_PG_REPLICAS    streaming replicas per shard (default 1; 0 for none)
#   CONVOY_LISTEN         the service's gRPC address (default 127.0.0.1:20051)
#   CONVOY_ETCD_PORT      etcd's client port; its peer port is the next one (default 22379)
#   CONVOY_REDIS_PORT     Redis's port (default 23379)
#   CONVOY_CACHE_LISTEN   the cache service's gRPC address (default 127.0.0.1:20061)
#   CONVOY_ROUTER_LISTEN  the shard-router's gRPC address (default 127.0.0.1:20071)
#   CONVOY_ANALYTICS_LISTEN the analytics service's gRPC address (default 127.0.0.1:20081)
#   CONVOY_CONVERSATION_METRICS_LISTEN, CONVOY_CACHE_METRICS_LISTEN, CONVOY_ROUTER_METRICS_LISTEN,
#   CONVOY_ANALYTICS_METRICS_LISTEN
#                         where conversation, cache, the shard-router and analytics serve
#                         Prometheus metrics at GET /metrics (defaults 127.0.0.1:9151, :9161,
#                         :9171, :9181: the targets of infra/observability/prometheus/prometheus.yml)
#   CONVOY_STATE_DIR      where data, logs and PID files live (default .convoy at the repo root)
#   CONVOY_PG_BIN         folder with initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin)
#   CONVOY_NO_AUTH        true: the services serve every caller, with no token (default: they
#                         verify tokens signed by the development key in $CONVOY_STATE_DIR/auth)
#   CONVOY_AUTH_KEYS, CONVOY_AUTH_TOKEN_FILE
#                         your own issuers' public keys and the services' own token, instead
#                         of the development key pair (docs/security.md)
#   Other CONVOY_* variables (CONVOY_LOG_FORMAT, CONVOY_POOL_MAX_CONNECTIONS, ...) reach the
#   conversation binary, which reads them itself (see `conversation --help`).
#
# State: $CONVOY_STATE_DIR/pg/shard-{0,1} and shard-{0,1}-replica-R (PostgreSQL data, kept
# between runs), $CONVOY_STATE_DIR/shard-map.toml (written at every start from the ports
# and replica count; the shard-router publishes it in etcd when it differs from the stored
# map, and the conversation service routes by the map in etcd),
# $CONVOY_STATE_DIR/etcd (etcd data), $CONVOY_STATE_DIR/redis (Redis's append-only file),
# $CONVOY_STATE_DIR/logs (postgres and service logs), $CONVOY_STATE_DIR/run (PID files of a
# detached fleet), $CONVOY_STATE_DIR/auth (the development key pair, kept, and tokens minted
# at every start: admin.token for convoyctl and service.token for the services' own calls,
# both with the fleet-wide grant; acme-writer.token for team acme's clients, without it).
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CONVOY_ROOT"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

mode=foreground
while (($# > 0)); do
    case "$1" in
    -d | --detach) mode=detach ;;
    --stop) mode=stop ;;
    --status) mode=status ;;
    --reset) mode=reset ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
    shift
done

SHARDS=2
REPLICAS="${CONVOY_PG_REPLICAS:-1}"
[[ "$REPLICAS" =~ ^[0-9]$ ]] || die "CONVOY_PG_REPLICAS must be 0 to 9, not $REPLICAS"
STATE_DIR="${CONVOY_STATE_DIR:-$CONVOY_ROOT/.convoy}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/logs"
PORT_BASE="${CONVOY_PG_PORT_BASE:-25432}"
LISTEN="${CONVOY_LISTEN:-127.0.0.1:20051}"
PROFILE="${CONVOY_BUILD_PROFILE:-release}"
SERVICE_PID_FILE="$RUN_DIR/conversation.pid"
SERVICE_LOG="$LOG_DIR/conversation.log"
ETCD_PORT="${CONVOY_ETCD_PORT:-22379}"
[[ "$ETCD_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_ETCD_PORT must be a port number, got '$ETCD_PORT'"
ETCD_PEER_PORT="$((ETCD_PORT + 1))"
ETCD_URL="http://127.0.0.1:$ETCD_PORT"
ETCD_DATA="$STATE_DIR/etcd"
ETCD_PID_FILE="$RUN_DIR/etcd.pid"
ETCD_LOG="$LOG_DIR/etcd.log"
REDIS_PORT="${CONVOY_REDIS_PORT:-23379}"
[[ "$REDIS_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_REDIS_PORT must be a port number, got '$REDIS_PORT'"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
REDIS_DATA="$STATE_DIR/redis"
REDIS_PID_FILE="$RUN_DIR/redis.pid"
REDIS_LOG="$LOG_DIR/redis.log"
CACHE_LISTEN="${CONVOY_CACHE_LISTEN:-127.0.0.1:20061}"
CACHE_PID_FILE="$RUN_DIR/cache.pid"
CACHE_LOG="$LOG_DIR/cache.log"
read -r CACHE_HOST CACHE_PORT < <(host_port_of "$CACHE_LISTEN")
[[ "$CACHE_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_CACHE_LISTEN must be HOST:PORT, got '$CACHE_LISTEN'"
ROUTER_LISTEN="${CONVOY_ROUTER_LISTEN:-127.0.0.1:20071}"
ROUTER_PID_FILE="$RUN_DIR/shard-router.pid"
ROUTER_LOG="$LOG_DIR/shard-router.log"
read -r ROUTER_HOST ROUTER_PORT < <(host_port_of "$ROUTER_LISTEN")
[[ "$ROUTER_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_ROUTER_LISTEN must be HOST:PORT, got '$ROUTER_LISTEN'"
ANALYTICS_LISTEN="${CONVOY_ANALYTICS_LISTEN:-127.0.0.1:20081}"
ANALYTICS_PID_FILE="$RUN_DIR/analytics.pid"
ANALYTICS_LOG="$LOG_DIR/analytics.log"
read -r ANALYTICS_HOST ANALYTICS_PORT < <(host_port_of "$ANALYTICS_LISTEN")
[[ "$ANALYTICS_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_ANALYTICS_LISTEN must be HOST:PORT, got '$ANALYTICS_LISTEN'"
# Prometheus metrics on loopback (gRPC port 500x1 -> 91x1).
METRICS_LISTEN="${CONVOY_CONVERSATION_METRICS_LISTEN:-127.0.0.1:9151}"
CACHE_METRICS_LISTEN="${CONVOY_CACHE_METRICS_LISTEN:-127.0.0.1:9161}"
ROUTER_METRICS_LISTEN="${CONVOY_ROUTER_METRICS_LISTEN:-127.0.0.1:9171}"
ANALYTICS_METRICS_LISTEN="${CONVOY_ANALYTICS_METRICS_LISTEN:-127.0.0.1:9181}"
[[ "$PORT_BASE" =~ ^[0-9]+$ ]] || die "CONVOY_PG_PORT_BASE must be a port number, got '$PORT_BASE'"
read -r PROBE_HOST PROBE_PORT < <(host_port_of "$LISTEN")
[[ "$PROBE_PORT" =~ ^[0-9]+$ ]] || die "CONVOY_LISTEN must be HOST:PORT, got '$LISTEN'"
# The address clients dial.
if [[ "$PROBE_HOST" == *:* ]]; then CALL_ADDR="[$PROBE_HOST]:$PROBE_PORT"; else CALL_ADDR="$PROBE_HOST:$PROBE_PORT"; fi

shard_data() { printf '%s/shard-%s\n' "$PG_ROOT" "$1"; }
shard_port() { printf '%s\n' "$((PORT_BASE + $1))"; }
replica_data() { printf '%s/shard-%s-replica-%s\n' "$PG_ROOT" "$1" "$2"; }
replica_port() { printf '%s\n' "$((PORT_BASE + 100 + 10 * $1 + $2))"; }

# The PID recorded in PID file $1 if that process is alive and its command line contains
# $2, or nothing (and status 1).
detached_pid() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1")"
    pid_is "$pid" "$2" || return 1
    printf '%s\n' "$pid"
}

# The PID of each detached process of the fleet, or nothing.
detached_service_pid() { detached_pid "$SERVICE_PID_FILE" conversation; }
detached_cache_pid() { detached_pid "$CACHE_PID_FILE" "$CACHE_LISTEN"; }
detached_router_pid() { detached_pid "$ROUTER_PID_FILE" "$ROUTER_LISTEN"; }
detached_analytics_pid() { detached_pid "$ANALYTICS_PID_FILE" "$ANALYTICS_LISTEN"; }
detached_redis_pid() { detached_pid "$REDIS_PID_FILE" redis-server; }
detached_etcd_pid() { detached_pid "$ETCD_PID_FILE" etcd; }

# Waits (at most 30 s) until process $1 accepts connections on $2:$3; otherwise prints
# the tail of its log $5 and exits, naming it $4.
wait_for_port() {
    local pid="$1" host="$2" port="$3" what="$4" logfile="$5" i
    for ((i = 0; i < 60; i++)); do
        pid_alive "$pid" || break
        tcp_open "$host" "$port" && return 0
        sleep 0.5
    done
    log "$what did not start; last lines of $logfile:"
    tail -n 30 "$logfile" >&2 || true
    exit 1
}

# stop_one VAR DETACHED_FN NAME TIMEOUT: stops the process whose PID is in variable VAR
# (started by this run) or, failing that, the detached one DETACHED_FN finds, then clears VAR.
stop_one() {
    local var="$1" pid
    pid="${!var:-}"
    [[ -n "$pid" ]] || pid="$("$2")" || true
    if [[ -n "$pid" ]]; then
        stop_pid "$pid" "$3" "$4"
    fi
    printf -v "$var" '%s' ""
}

# Stops the services (SERVICE_PID, or the detached one; they deregister from etcd on the
# way out), then Redis and etcd, then every shard of this state folder, and removes the PID
# files.
stop_fleet() {
    # The services drain in-flight calls for up to --drain-timeout-secs (20 s by default).
    stop_one ANALYTICS_PID detached_analytics_pid "analytics service" 30
    stop_one SERVICE_PID detached_service_pid "conversation service" 30
    stop_one CACHE_PID detached_cache_pid "cache service" 30
    stop_one ROUTER_PID detached_router_pid "shard-router" 30
    stop_one REDIS_PID detached_redis_pid "redis" 10
    stop_one ETCD_PID detached_etcd_pid "etcd" 10
    local i
    for ((i = 0; i < SHARDS; i++)); do
        for data in "$PG_ROOT/shard-$i-replica-"*; do
            [[ -d "$data" ]] && pg_stop "$data"
        done
        pg_stop "$(shard_data "$i")"
    done
    rm -f "$RUN_DIR"/*.pid
}

print_status() {
    local pid i data any=1
    if pid="$(detached_service_pid)"; then
        echo "conversation: running, pid $pid, log $SERVICE_LOG"
        any=0
    else
        echo "conversation: not running (detached)"
    fi
    if pid="$(detached_cache_pid)"; then
        echo "cache: running, pid $pid, $CACHE_LISTEN, log $CACHE_LOG"
        any=0
    else
        echo "cache: not running (detached)"
    fi
    if pid="$(detached_router_pid)"; then
        echo "shard-router: running, pid $pid, $ROUTER_LISTEN, log $ROUTER_LOG"
        any=0
    else
        echo "shard-router: not running (detached)"
    fi
    if pid="$(detached_analytics_pid)"; then
        echo "analytics: running, pid $pid, $ANALYTICS_LISTEN, log $ANALYTICS_LOG"
        any=0
    else
        echo "analytics: not running (detached)"
    fi
    if pid="$(detached_redis_pid)"; then
        echo "redis: running, pid $pid, $REDIS_URL, data $REDIS_DATA"
        any=0
    else
        echo "redis: not running (detached), data $REDIS_DATA"
    fi
    if pid="$(detached_etcd_pid)"; then
        echo "etcd: running, pid $pid, $ETCD_URL, data $ETCD_DATA"
        any=0
    else
        echo "etcd: not running (detached), data $ETCD_DATA"
    fi
    for ((i = 0; i < SHARDS; i++)); do
        data="$(shard_data "$i")"
        if pid="$(pg_pid "$data")"; then
            echo "shard-$i: running, pid $pid, data $data"
            any=0
        else
            echo "shard-$i: not running, data $data"
        fi
        for data in "$PG_ROOT/shard-$i-replica-"*; do
            [[ -d "$data" ]] || continue
            if pid="$(pg_pid "$data")"; then
                echo "$(basename "$data"): running, pid $pid, data $data"
                any=0
            else
                echo "$(basename "$data"): not running, data $data"
            fi
        done
    done
    return "$any"
}

print_howto() {
    local ctl="$CTL_BIN --etcd-endpoint $ETCD_URL" grpcurl="grpcurl -plaintext" smoke_env="" auth_lines
    auth_lines="  auth:   none (CONVOY_NO_AUTH): every caller may call everything"
    if [[ -n "$AUTH_DIR" ]]; then
        ctl="$CTL_BIN --etcd-endpoint $ETCD_URL --token-file $AUTH_DIR/admin.token"
        # shellcheck disable=SC2016 # the $(cat ...) is for the reader's shell
        grpcurl="grpcurl -plaintext -H \"authorization: Bearer \$(cat $AUTH_DIR/acme-writer.token)\""
        smoke_env="CONVOY_TOKEN_FILE=$AUTH_DIR/admin.token "
        auth_lines="  auth:   tokens signed by the development key $AUTH_DIR/dev-1.key (public: $AUTH_DIR/keys);
          team acme's writer: $AUTH_DIR/acme-writer.token, fleet admin: $AUTH_DIR/admin.token;
          a ready token (team acme, writer, 30 days): $(cat "$AUTH_DIR/acme-writer.token")
          more: $CTL_BIN token mint --key $AUTH_DIR/dev-1.key --team T --role reader|writer|admin [--fleet]"
    elif [[ -n "${CONVOY_AUTH_KEYS:-}" ]]; then
        auth_lines="  auth:   tokens signed by the keys in $CONVOY_AUTH_KEYS (add --token-file to convoyctl, -H 'authorization: Bearer ...' to grpcurl)"
    fi
    cat <<EOF

convoy is up: conversation service on $LISTEN, cache service on $CACHE_LISTEN,
  shard-router on $ROUTER_LISTEN (the shards' health and lag: $ctl shards),
  analytics service on $ANALYTICS_LISTEN
  shards: postgres://postgres@127.0.0.1:$(shard_port 0)/convoy, postgres://postgres@127.0.0.1:$(shard_port 1)/convoy
          ($REPLICAS streaming replica(s) each; the map: $SHARD_MAP)
  etcd:   $ETCD_URL (the fleet as etcd sees it: $ctl status)
  redis:  $REDIS_URL (invalidation bus: redis-cli -p $REDIS_PORT XLEN convoy:invalidations)
$auth_lines
  logs:   $LOG_DIR
  metrics: http://$METRICS_LISTEN/metrics (conversation), http://$CACHE_METRICS_LISTEN/metrics (cache),
           http://$ROUTER_METRICS_LISTEN/metrics (shard-router), http://$ANALYTICS_METRICS_LISTEN/metrics (analytics)

Call it with the Python smoke client (stock gRPC + server reflection; deps in infra/local/requirements.txt):
  ${smoke_env}python3 infra/local/smoke.py $CALL_ADDR

or, if you have grpcurl:
  $grpcurl $CALL_ADDR list
  $grpcurl -d '{"parent":"teams/acme","conversation":{"title":"Flaky test in CI","intent":"INTENT_DEBUG"}}' $CALL_ADDR convoy.v1.ConversationService/CreateConversation
  $grpcurl -d '{"parent":"teams/acme"}' $CALL_ADDR convoy.v1.ConversationService/ListConversations
  grpcurl -plaintext -d '{"service":"convoy.v1.ConversationService"}' $CALL_ADDR grpc.health.v1.Health/Check
  $grpcurl -d '{"filter":{"parent":"teams/acme","start_time":"2026-01-01T00:00:00Z","end_time":"2027-01-01T00:00:00Z"}}' $ANALYTICS_LISTEN convoy.v1.AnalyticsService/GetTeamSummary

EOF
}

case "$mode" in
status)
    PG_ROOT="$(readlink -f "$STATE_DIR/pg")"
    print_status
    exit $?
    ;;
stop)
    PG_ROOT="$(readlink -f "$STATE_DIR/pg")"
    if [[ ! -d "$PG_ROOT" && ! -f "$SERVICE_PID_FILE" ]]; then
        log "nothing to stop in $STATE_DIR"
        exit 0
    fi
    stop_fleet
    log "stopped"
    exit 0
    ;;
reset)
    PG_ROOT="$(readlink -f "$STATE_DIR/pg")"
    stop_fleet
    rm -rf "$PG_ROOT" "$STATE_DIR/pg" "$ETCD_DATA" "$REDIS_DATA" "$LOG_DIR" "$RUN_DIR"
    log "deleted the fleet's data and logs in $STATE_DIR"
    exit 0
    ;;
esac

# --- start (foreground or detached) ---

# Checks first, before anything is started (and before the clean-up trap exists, so that a
# refusal never stops a fleet that is already running).
if pid="$(detached_service_pid)"; then
    die "a detached fleet is already running from $STATE_DIR (conversation pid $pid); stop it with: infra/local/up.sh --stop"
fi
# Every port the fleet listens on, before anything starts (Postgres's are checked as each
# server starts, since one of this state folder's may be running already).
require_port_free "$PROBE_PORT" "conversation's gRPC" CONVOY_LISTEN
require_port_free "$CACHE_PORT" "the cache service's gRPC" CONVOY_CACHE_LISTEN
require_port_free "$ROUTER_PORT" "the shard-router's gRPC" CONVOY_ROUTER_LISTEN
require_port_free "$ANALYTICS_PORT" "analytics' gRPC" CONVOY_ANALYTICS_LISTEN
for metrics_addr in "$METRICS_LISTEN" "$CACHE_METRICS_LISTEN" "$ROUTER_METRICS_LISTEN" "$ANALYTICS_METRICS_LISTEN"; do
    read -r metrics_host metrics_port < <(host_port_of "$metrics_addr")
    [[ "$metrics_port" =~ ^[0-9]+$ ]] || die "a metrics address must be HOST:PORT, got '$metrics_addr'"
    require_port_free "$metrics_port" "metrics at $metrics_addr" "CONVOY_*_METRICS_LISTEN"
done
require_port_free "$REDIS_PORT" "Redis" CONVOY_REDIS_PORT
require_port_free "$ETCD_PORT" "etcd's clients" CONVOY_ETCD_PORT
require_port_free "$ETCD_PEER_PORT" "etcd's peers" CONVOY_ETCD_PORT

ensure_packages

case "$PROFILE" in
dev | debug) cargo_profile=(--profile dev) ;;
*) cargo_profile=(--profile "$PROFILE") ;;
esac
log "building the services and convoyctl (cargo build ${cargo_profile[*]} -p conversation -p cache -p shard-router -p analytics -p convoyctl)"
build_json="$(cargo build "${cargo_profile[@]}" -p conversation -p cache -p shard-router -p analytics -p convoyctl --message-format=json-render-diagnostics)" ||
    die "cargo build failed"
# The path cargo reports for a built binary (or the usual place, if it reported none).
built_binary() {
    local path
    path="$(grep -o "\"executable\":\"[^\"]*/$1\"" <<<"$build_json" | tail -n1 | sed 's/^"executable":"//;s/"$//')" || true
    if [[ -z "$path" ]]; then
        case "$PROFILE" in dev | debug) sub=debug ;; *) sub="$PROFILE" ;; esac
        path="${CARGO_TARGET_DIR:-$CONVOY_ROOT/target}/$sub/$1"
    fi
    [[ -x "$path" ]] || die "built binary not found at $path"
    printf '%s\n' "$path"
}
BIN="$(built_binary conversation)"
CTL_BIN="$(built_binary convoyctl)"
CACHE_BIN="$(built_binary cache)"
ROUTER_BIN="$(built_binary shard-router)"
ANALYTICS_BIN="$(built_binary analytics)"
# Tokens: a development key pair and fresh tokens in $STATE_DIR/auth (lib.sh's dev_auth).
dev_auth "$STATE_DIR" "$CTL_BIN"

SERVICE_PID=""
ETCD_PID=""
REDIS_PID=""
CACHE_PID=""
ROUTER_PID=""
ANALYTICS_PID=""
COMMITTED=0
# shellcheck disable=SC2317 # called by the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ "$COMMITTED" != 1 ]]; then
        case "$rc" in
        0) ;;
        129 | 130 | 143) log "signal received: stopping the fleet" ;;
        *) log "cleaning up after failure (exit $rc)" ;;
        esac
        stop_fleet
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

mkdir -p "$RUN_DIR" "$LOG_DIR"
PG_ROOT="$(pg_root_for "$STATE_DIR")"
pg_owned_dir "$PG_ROOT"
# PostgreSQL writes its log as the postgres user: next to the data when it cannot reach
# LOG_DIR, with a symlink in LOG_DIR.
PG_LOG_DIR="$LOG_DIR"
if ! pg_can_enter "$LOG_DIR"; then
    PG_LOG_DIR="$PG_ROOT/logs"
    pg_owned_dir "$PG_LOG_DIR"
fi
for ((i = 0; i < SHARDS; i++)); do
    data="$(shard_data "$i")"
    port="$(shard_port "$i")"
    pg_init "$data"
    pg_start "$data" "$port" "$PG_LOG_DIR/pg-shard-$i.log"
    if [[ "$PG_LOG_DIR" != "$LOG_DIR" ]]; then
        ln -sfn "$PG_LOG_DIR/pg-shard-$i.log" "$LOG_DIR/pg-shard-$i.log"
    fi
done
# The shard map: slots split evenly (as --shard-dsn would), each shard with its replicas.
SHARD_MAP="$STATE_DIR/shard-map.toml"
{
    echo "# Written by infra/local/up.sh at every start."
    echo "epoch = 1"
    for ((i = 0; i < SHARDS; i++)); do
        replicas=()
        for ((r = 0; r < REPLICAS; r++)); do
            data="$(replica_data "$i" "$r")"
            port="$(replica_port "$i" "$r")"
            pg_init_replica "$data" "$(shard_port "$i")"
            pg_start "$data" "$port" "$PG_LOG_DIR/pg-shard-$i-replica-$r.log"
            if [[ "$PG_LOG_DIR" != "$LOG_DIR" ]]; then
                ln -sfn "$PG_LOG_DIR/pg-shard-$i-replica-$r.log" "$LOG_DIR/pg-shard-$i-replica-$r.log"
            fi
            replicas+=("\"postgres://postgres@127.0.0.1:$port/convoy\"")
        done
        echo "[[shards]]"
        echo "id = \"shard-$i\""
        echo "primary = \"postgres://postgres@127.0.0.1:$(shard_port "$i")/convoy\""
        echo "replicas = [$(
            IFS=,
            echo "${replicas[*]}"
        )]"
        echo "slots = [\"$((i * 1024 / SHARDS))-$(((i + 1) * 1024 / SHARDS - 1))\"]"
    done
} >"$SHARD_MAP"
# The shard-router seeds etcd with this map; the conversation service reads it from there.
dsn_args=(--shard-map-from-etcd)

log "starting etcd on $ETCD_URL (log: $ETCD_LOG)"
mkdir -p "$ETCD_DATA"
# ETCD_* variables would override the flags below.
unset_etcd_env=()
while IFS= read -r name; do unset_etcd_env+=(-u "$name"); done < <(env | grep -o '^ETCD_[A-Z_]*' || true)
env "${unset_etcd_env[@]}" \
    setsid etcd --name convoy-local --data-dir "$ETCD_DATA" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "convoy-local=http://127.0.0.1:$ETCD_PEER_PORT" \
    </dev/null >>"$ETCD_LOG" 2>&1 &
ETCD_PID=$!
wait_for_port "$ETCD_PID" 127.0.0.1 "$ETCD_PORT" "etcd" "$ETCD_LOG"

log "starting redis on $REDIS_URL (log: $REDIS_LOG)"
mkdir -p "$REDIS_DATA"
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DATA" \
    --appendonly yes --save "" </dev/null >>"$REDIS_LOG" 2>&1 &
REDIS_PID=$!
wait_for_port "$REDIS_PID" 127.0.0.1 "$REDIS_PORT" "redis" "$REDIS_LOG"

log "starting cache on $CACHE_LISTEN (log: $CACHE_LOG)"
env -u CONVOY_LISTEN NO_COLOR=1 \
    setsid "$CACHE_BIN" --listen "$CACHE_LISTEN" --redis-url "$REDIS_URL" --etcd-endpoint "$ETCD_URL" \
    --metrics-listen "$CACHE_METRICS_LISTEN" \
    </dev/null >>"$CACHE_LOG" 2>&1 &
CACHE_PID=$!
wait_for_port "$CACHE_PID" "$CACHE_HOST" "$CACHE_PORT" "the cache service" "$CACHE_LOG"

log "starting shard-router on $ROUTER_LISTEN (log: $ROUTER_LOG)"
env -u CONVOY_LISTEN -u CONVOY_SHARD_MAP NO_COLOR=1 \
    setsid "$ROUTER_BIN" --listen "$ROUTER_LISTEN" --etcd-endpoint "$ETCD_URL" --shard-map "$SHARD_MAP" --publish-shard-map \
    --metrics-listen "$ROUTER_METRICS_LISTEN" \
    </dev/null >>"$ROUTER_LOG" 2>&1 &
ROUTER_PID=$!
wait_for_port "$ROUTER_PID" "$ROUTER_HOST" "$ROUTER_PORT" "the shard-router" "$ROUTER_LOG"

log "starting conversation on $LISTEN (log: $SERVICE_LOG)"
printf '\n==== %s: %s %s --listen %s\n' "$(date -u +%FT%TZ)" "$BIN" "${dsn_args[*]}" "$LISTEN" >>"$SERVICE_LOG"
# Its own session: Ctrl-C reaches only this script, which then stops the service before
# the shards; a detached service survives the terminal.
# NO_COLOR: plain text in the log file.
env -u CONVOY_SHARD_MAP -u CONVOY_SHARD_DSNS -u CONVOY_MIGRATE_ONLY -u CONVOY_SHARD_MAP_FROM_ETCD NO_COLOR=1 \
    setsid "$BIN" "${dsn_args[@]}" --listen "$LISTEN" --etcd-endpoint "$ETCD_URL" --redis-url "$REDIS_URL" \
    --metrics-listen "$METRICS_LISTEN" </dev/null >>"$SERVICE_LOG" 2>&1 &
SERVICE_PID=$!

ready=0
for ((i = 0; i < 120; i++)); do
    if ! pid_alive "$SERVICE_PID"; then
        break
    fi
    if tcp_open "$PROBE_HOST" "$PROBE_PORT"; then
        ready=1
        break
    fi
    sleep 0.5
done
if ((ready == 0)); then
    if pid_alive "$SERVICE_PID"; then
        log "the service did not accept connections on $LISTEN within 60 s"
    else
        wait "$SERVICE_PID" && rc=0 || rc=$?
        log "the service exited (status $rc) before accepting connections"
    fi
    log "last lines of $SERVICE_LOG:"
    tail -n 40 "$SERVICE_LOG" >&2 || true
    if tail -n 200 "$SERVICE_LOG" | grep -q 'previously applied but has been modified'; then
        log "an already-applied migration file changed since this data was created; to start over with empty" \
            "shards run: infra/local/up.sh --reset (deletes the local data)"
    fi
    exit 1
fi

log "starting analytics on $ANALYTICS_LISTEN (log: $ANALYTICS_LOG)"
env -u CONVOY_LISTEN -u CONVOY_SHARD_MAP -u CONVOY_SHARD_DSNS -u CONVOY_METRICS_LISTEN NO_COLOR=1 \
    setsid "$ANALYTICS_BIN" --listen "$ANALYTICS_LISTEN" --etcd-endpoint "$ETCD_URL" --shard-map-from-etcd \
    --metrics-listen "$ANALYTICS_METRICS_LISTEN" --prices "${CONVOY_PRICES:-$CONVOY_ROOT/infra/local/prices.toml}" \
    </dev/null >>"$ANALYTICS_LOG" 2>&1 &
ANALYTICS_PID=$!
wait_for_port "$ANALYTICS_PID" "$ANALYTICS_HOST" "$ANALYTICS_PORT" "the analytics service" "$ANALYTICS_LOG"

print_howto

if [[ "$mode" == detach ]]; then
    printf '%s\n' "$SERVICE_PID" >"$SERVICE_PID_FILE"
    printf '%s\n' "$ETCD_PID" >"$ETCD_PID_FILE"
    printf '%s\n' "$REDIS_PID" >"$REDIS_PID_FILE"
    printf '%s\n' "$CACHE_PID" >"$CACHE_PID_FILE"
    printf '%s\n' "$ROUTER_PID" >"$ROUTER_PID_FILE"
    printf '%s\n' "$ANALYTICS_PID" >"$ANALYTICS_PID_FILE"
    for ((i = 0; i < SHARDS; i++)); do
        pg_pid "$(shard_data "$i")" >"$RUN_DIR/pg-shard-$i.pid" || true
        for ((r = 0; r < REPLICAS; r++)); do
            pg_pid "$(replica_data "$i" "$r")" >"$RUN_DIR/pg-shard-$i-replica-$r.pid" || true
        done
    done
    COMMITTED=1
    stop_cmd="infra/local/up.sh --stop"
    if [[ -n "${CONVOY_STATE_DIR:-}" ]]; then stop_cmd="CONVOY_STATE_DIR=$STATE_DIR $stop_cmd"; fi
    echo "Running in the background (conversation pid $SERVICE_PID). Stop it with: $stop_cmd"
    exit 0
fi

echo "Running in the foreground. Press Ctrl-C to stop the services, Redis, etcd and the shards."
set +e
wait "$SERVICE_PID"
rc=$?
set -e
# Only reached when the service exited by itself (a signal to this script runs its trap).
log "the conversation service exited by itself (status $rc); last lines of $SERVICE_LOG:"
tail -n 20 "$SERVICE_LOG" >&2 || true
SERVICE_PID=""
exit $((rc == 0 ? 1 : rc))
