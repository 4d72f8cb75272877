#!/usr/bin/env bash
# Runs convoy's tests: the whole Rust workspace, then a smoke test of a real fleet.
#
#   infra/local/test.sh
#
# Steps, failing fast:
#   0. the offline checks of infra/observability, infra/docker (hadolint, COPY sources),
#      k8s/ (kustomize, schemas, checkov, consistency) and the Tiltfile (evaluated with
#      Tilt's builtins stubbed): see each check.sh; then the dependency tree's policy in
#      deny.toml: cargo fetch, cargo deny --offline check bans licenses sources;
#   1. cargo test --workspace --all-targets, then cargo test --workspace --doc (the tests
#      start their own private PostgreSQL servers);
#   2. the fleet smoke: infra/local/up.sh --detach (dev build) in a temporary state folder on
#      ports of its own, so it never touches your own fleet, with authorization on (up.sh's
#      development key; the smoke's calls carry its admin token); infra/local/smoke.py against
#      it (which also checks that a call without a token is UNAUTHENTICATED),
#      `convoyctl status` must show the instance SERVING in etcd, the writes must reach the
#      invalidation bus in Redis, `convoyctl cache consistency` must show them checked and
#      consistent (every write sampled, checked after 200 ms), each shard's replica must be a
#      standby that received the smoke's writes, `convoyctl queries` must list the smoke's
#      inserts from pg_stat_statements, `convoyctl import claude-code` must import the test
#      transcripts exactly (and nothing on a second run), `convoyctl bench` must run every scenario (and
#      the baselines of get, write, list-search and analytics) for a second without an error; after a SIGKILL the
#      instance must leave etcd within its lease TTL; then up.sh --stop, always.
#
# Environment:
#   CONVOY_SKIP_CARGO_TESTS=1   skip step 1 (run only the fleet smoke)
# The smoke's ports sit below Linux's ephemeral range (32768-60999): a port in it may be held
# for a while by one of the tests' own outgoing connections (TIME_WAIT), and etcd once failed
# to bind its peer port there.
#   CONVOY_TEST_PG_PORT_BASE    the smoke fleet's first PostgreSQL port (default 26432)
#   CONVOY_TEST_LISTEN          the smoke fleet's gRPC address (default 127.0.0.1:26051)
#   CONVOY_TEST_ETCD_PORT       the smoke fleet's etcd client port (default 26379)
#   CONVOY_TEST_REDIS_PORT      the smoke fleet's Redis port (default 26479)
#   CONVOY_TEST_CACHE_LISTEN    the smoke fleet's cache service address (default 127.0.0.1:26061)
#   CONVOY_TEST_ROUTER_LISTEN   the smoke fleet's shard-router address (default 127.0.0.1:26071)
# Installs missing system packages (apt), the smoke client's Python packages (pip) and
# cargo-deny, pinned (cargo install into cargo's bin folder, about 3 minutes on 2 cores).
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CONVOY_ROOT"

ensure_packages
ensure_python_deps
ensure_cargo_deny
bash infra/observability/check.sh
# The deployment files, offline (no container engine, cluster or Tilt here): the
# Dockerfile, the Kubernetes manifests, the Tiltfile.
bash infra/docker/check.sh
bash infra/k8s/check.sh
bash infra/tilt/check.sh
# Licenses, banned crates and sources of every dependency (deny.toml).
cargo_deny_check

if [[ "${CONVOY_SKIP_CARGO_TESTS:-0}" == 1 ]]; then
    log "CONVOY_SKIP_CARGO_TESTS=1: skipping cargo test"
else
    log "cargo test --workspace --all-targets"
    cargo test --workspace --all-targets
    log "cargo test --workspace --doc"
    cargo test --workspace --doc
fi

# --- fleet smoke ---
smoke_state="$(mktemp -d "${TMPDIR:-/tmp}/convoy-smoke.XXXXXX")"
# PostgreSQL runs as the postgres user when we are root: it must be able to enter the folder.
chmod 0755 "$smoke_state"
smoke_env=(
    CONVOY_STATE_DIR="$smoke_state"
    CONVOY_BUILD_PROFILE=dev
    CONVOY_PG_PORT_BASE="${CONVOY_TEST_PG_PORT_BASE:-26432}"
    CONVOY_LISTEN="${CONVOY_TEST_LISTEN:-127.0.0.1:26051}"
    CONVOY_ETCD_PORT="${CONVOY_TEST_ETCD_PORT:-26379}"
    CONVOY_REDIS_PORT="${CONVOY_TEST_REDIS_PORT:-26479}"
    CONVOY_CACHE_LISTEN="${CONVOY_TEST_CACHE_LISTEN:-127.0.0.1:26061}"
    CONVOY_ROUTER_LISTEN="${CONVOY_TEST_ROUTER_LISTEN:-127.0.0.1:26071}"
    CONVOY_ANALYTICS_LISTEN="${CONVOY_TEST_ANALYTICS_LISTEN:-127.0.0.1:26081}"
    CONVOY_CONVERSATION_METRICS_LISTEN=127.0.0.1:26151
    CONVOY_CACHE_METRICS_LISTEN=127.0.0.1:26161
    CONVOY_ROUTER_METRICS_LISTEN=127.0.0.1:26171
    CONVOY_ANALYTICS_METRICS_LISTEN=127.0.0.1:26181
    CONVOY_PG_REPLICAS=1
    # Sample every write, checked 200 ms after it: the consistency report has data at once.
    CONVOY_CONSISTENCY_SAMPLE_RATIO=1
    CONVOY_CONSISTENCY_CHECK_AFTER_MS=200
)
smoke_ok=0
cleanup_smoke() {
    local rc=$?
    trap - EXIT INT TERM HUP
    env "${smoke_env[@]}" bash infra/local/up.sh --stop || rc=1
    if [[ "$smoke_ok" != 1 ]]; then
        local f
        for f in "$smoke_state"/logs/*.log; do
            [[ -f "$f" ]] || continue
            log "last lines of $f:"
            tail -n 30 "$f" >&2 || true
        done
    fi
    rm -rf "$smoke_state"
    exit "$rc"
}
trap cleanup_smoke EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

log "fleet smoke: starting a detached fleet in $smoke_state"
env "${smoke_env[@]}" bash infra/local/up.sh --detach
# up.sh made a development key pair and tokens: the smoke's calls (smoke.py, convoyctl) carry
# its admin token.
[[ -s "$smoke_state/auth/admin.token" ]] || die "up.sh did not mint $smoke_state/auth/admin.token"
export CONVOY_TOKEN_FILE="$smoke_state/auth/admin.token"
read -r host port < <(host_port_of "${CONVOY_TEST_LISTEN:-127.0.0.1:26051}")
[[ "$host" == *:* ]] && host="[$host]"
analytics_addr="${CONVOY_TEST_ANALYTICS_LISTEN:-127.0.0.1:26081}"
log "fleet smoke: python3 infra/local/smoke.py $host:$port $analytics_addr"
python3 infra/local/smoke.py "$host:$port" "$analytics_addr"
# The replicas are standbys and the smoke's conversation reached one of them.
pg_base="${CONVOY_TEST_PG_PORT_BASE:-26432}"
replicated=0
for ((i = 0; i < 40; i++)); do
    replicated=0
    for port in $((pg_base + 100)) $((pg_base + 110)); do
        # Only standbys count; a replica that does not answer yet is asked again.
        standby="$(pg_run psql -X -h 127.0.0.1 -p "$port" -U postgres -d convoy -tAc \
            'SELECT count(*) FROM conversations WHERE pg_is_in_recovery()' 2>/dev/null || echo 0)"
        replicated=$((replicated + ${standby:-0}))
    done
    ((replicated >= 1)) && break
    sleep 0.25
done
((replicated >= 1)) || die "the smoke's conversation never reached a standby replica"
log "fleet smoke: the replicas are standbys and hold the smoke's conversation"
etcd_url="http://127.0.0.1:${CONVOY_TEST_ETCD_PORT:-26379}"
log "fleet smoke: convoyctl --etcd-endpoint $etcd_url status"
status_table="$("${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" status)"
printf '%s\n' "$status_table"
grep -q "^conversation .*SERVING$" <<<"$status_table" ||
    die "convoyctl status does not show the conversation instance as SERVING"
grep -q "^cache .*SERVING$" <<<"$status_table" ||
    die "convoyctl status does not show the cache instance as SERVING"
grep -q "^shard-router .*SERVING$" <<<"$status_table" ||
    die "convoyctl status does not show the shard-router as SERVING"
grep -q "^analytics .*SERVING$" <<<"$status_table" ||
    die "convoyctl status does not show the analytics instance as SERVING"

# The shard-router reports every node of the map healthy (primaries and replicas).
shards_table=""
for ((i = 0; i < 40; i++)); do
    shards_table="$("${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" shards || true)"
    (($(grep -c " HEALTHY " <<<"$shards_table") == 4)) && break
    sleep 0.25
done
log "fleet smoke: convoyctl --etcd-endpoint $etcd_url shards"
printf '%s\n' "$shards_table"
(($(grep -c " HEALTHY " <<<"$shards_table") == 4)) ||
    die "convoyctl shards does not show the 2 primaries and 2 replicas as HEALTHY"

# pg_stat_statements counts the smoke's writes on the shards of the map in etcd.
log "fleet smoke: convoyctl --etcd-endpoint $etcd_url queries --by total"
queries_table="$("${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" queries --by total --top 50)"
printf '%s\n' "$queries_table"
grep -q "^shard-[01] .*INSERT INTO conversations" <<<"$queries_table" ||
    die "convoyctl queries does not list the smoke's inserts into conversations"
grep -q "not installed\|not loaded\|unreachable" <<<"$queries_table" &&
    die "convoyctl queries could not read a shard's statistics"

# The load generator, CI-sized: every scenario for a second at a low rate through the SDK
# (and the baselines: bare tonic, raw Redis for get, and each scenario's own statements sent
# straight to SQL for get, write, list-search and analytics), with no error allowed.
bench_args=(--duration-secs 1 --warmup-secs 0.2 --rate 20 --conversations 100 --teams 5
    --data "$smoke_state/bench-data.json" --max-error-ratio 0)
for scenario in get write mixed list-search analytics scan; do
    extra=(--no-baseline)
    case "$scenario" in
    get) extra=(--redis-url "redis://127.0.0.1:${CONVOY_TEST_REDIS_PORT:-26479}" --json "$smoke_state/bench-get.json") ;;
    # Their default baselines: bare tonic and their own statements sent straight to SQL.
    write | list-search | analytics) extra=(--json "$smoke_state/bench-$scenario.json") ;;
    esac
    log "fleet smoke: convoyctl bench --scenario $scenario ${bench_args[*]} ${extra[*]}"
    "${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" bench --scenario "$scenario" \
        "${bench_args[@]}" "${extra[@]}" || die "convoyctl bench --scenario $scenario failed"
done
python3 - "$smoke_state" <<'PY' || die "the bench's JSON reports are not what they should be"
import json, sys
expected = {
    "get": ["get", "baseline:tonic", "baseline:redis", "baseline:sql"],
    "write": ["write", "baseline:tonic", "baseline:sql"],
    "list-search": ["list-search", "baseline:tonic", "baseline:sql"],
    "analytics": ["analytics", "baseline:tonic", "baseline:sql"],
}
for scenario, targets in expected.items():
    report = json.load(open(f"{sys.argv[1]}/bench-{scenario}.json"))
    assert report["scenario"] == scenario, report["scenario"]
    assert [s["target"] for s in report["summaries"]] == targets, (scenario, report["summaries"])
    for s in report["summaries"]:
        assert s["ok"] == 20 and s["p50_us"] > 0 and s["p99_us"] >= s["p50_us"], s
PY

# Transcripts in: the hand-written Claude Code sessions of the integration tests, through
# the discovered fleet with the admin token, twice (the second finds nothing new).
import_args=(claude-code tests/integration/fixtures/claude-code --team smoke-import
    --state-file "$smoke_state/import-state.json")
for run in first second; do
    log "fleet smoke: convoyctl import ${import_args[*]} ($run run)"
    imported="$("${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" import "${import_args[@]}")" ||
        die "convoyctl import claude-code failed"
    printf '%s\n' "$imported"
    want="3 files, 2 sessions, 20 lines: 19 events stored, 0 already there, 2 lines skipped"
    [[ "$run" == second ]] && want="3 files, 0 sessions, 0 lines: 0 events stored, 0 already there, 0 lines skipped"
    grep -qF "$want" <<<"$imported" || die "convoyctl import ($run run) did not report: $want"
done

# The smoke's writes reached the invalidation bus through the outbox relay.
redis_port="${CONVOY_TEST_REDIS_PORT:-26479}"
bus_len=0
for ((i = 0; i < 40; i++)); do
    bus_len="$(redis-cli -p "$redis_port" XLEN convoy:invalidations)"
    ((bus_len >= 2)) && break
    sleep 0.25
done
((bus_len >= 2)) || die "the smoke's writes did not reach the invalidation bus (XLEN convoy:invalidations = $bus_len)"
log "fleet smoke: $bus_len changes on the invalidation bus"

# The consistency sampler checked the smoke's writes, and no cache contradicted one.
redis_url="redis://127.0.0.1:$redis_port"
report=""
for ((i = 0; i < 40; i++)); do
    report="$("${CARGO_TARGET_DIR:-target}/debug/convoyctl" cache consistency --redis-url "$redis_url")"
    grep -q "^200ms " <<<"$report" && break
    sleep 0.25
done
log "fleet smoke: convoyctl cache consistency --redis-url $redis_url"
printf '%s\n' "$report"
grep -q "^200ms .* 0 .*100.0000%" <<<"$report" ||
    die "the consistency sampler did not report the smoke's writes as consistent within 200 ms"

# A SIGKILLed instance cannot deregister: it must leave etcd when its lease expires (10 s).
service_pid="$(cat "$smoke_state/run/conversation.pid")"
log "fleet smoke: kill -9 the conversation service (pid $service_pid); waiting for its lease to expire"
kill -9 "$service_pid"
gone=0
for ((i = 0; i < 40; i++)); do
    sleep 0.5
    if ! "${CARGO_TARGET_DIR:-target}/debug/convoyctl" --etcd-endpoint "$etcd_url" status |
        grep -q "^conversation "; then
        gone=1
        log "fleet smoke: the killed instance left etcd after about $(((i + 1) / 2)) s"
        break
    fi
done
((gone == 1)) || die "the killed instance was still registered 20 s after SIGKILL"
smoke_ok=1
log "all tests passed"
