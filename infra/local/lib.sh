# shellcheck shell=bash
# Shared helpers for infra/local/*.sh. Source it; it defines functions and a few
# variables and runs nothing else.
#
# Environment it honours:
#   CONVOY_PG_BIN   folder holding initdb/pg_ctl/pg_isready/createdb (the same variable
#                   the Rust testkit reads); default: the newest /usr/lib/postgresql/*/bin,
#                   else PATH.

# Repository root: this file lives in infra/local/.
CONVOY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONVOY_ROOT

# libpq variables that would redirect or alter the helper commands (createdb, pg_isready).
CONVOY_PG_ENV_VARS=(PGDATA PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE
    PGSERVICE PGSERVICEFILE PGOPTIONS PGSSLMODE PGCONNECT_TIMEOUT PGTZ)

log() { printf '[convoy] %s\n' "$*" >&2; }
warn() { printf '[convoy] warning: %s\n' "$*" >&2; }
die() {
    printf '[convoy] error: %s\n' "$*" >&2
    exit 1
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# The folder holding the PostgreSQL server programs, or nothing.
pg_bin_dir() {
    if [[ -n "${CONVOY_PG_BIN:-}" ]]; then
        printf '%s\n' "$CONVOY_PG_BIN"
        return 0
    fi
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && best="$d" # glob order: the last is the newest major (until 100)
    done
    if [[ -z "$best" ]] && command -v initdb >/dev/null 2>&1; then
        best="$(dirname "$(command -v initdb)")"
    fi
    [[ -n "$best" ]] && printf '%s\n' "$best"
}

# Installs the system packages the fleet and the tests need, when any is missing.
ensure_packages() {
    local missing=()
    command -v protoc >/dev/null 2>&1 || missing+=(protoc)
    [[ -n "$(pg_bin_dir)" ]] || missing+=(initdb)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v etcd >/dev/null 2>&1 || missing+=(etcd)
    if ((${#missing[@]} > 0)); then
        local pkgs=(protobuf-compiler postgresql redis-server etcd-server)
        local sudo=()
        if ! is_root; then
            if command -v sudo >/dev/null 2>&1; then
                sudo=(sudo)
            else
                die "missing: ${missing[*]}. Install them as root: apt-get install -y ${pkgs[*]}"
            fi
        fi
        log "missing ${missing[*]}: installing ${pkgs[*]} with apt-get"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}"
        [[ -n "$(pg_bin_dir)" ]] || die "PostgreSQL installed but initdb still not found under /usr/lib/postgresql/*/bin"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        die "cargo not found. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . \"\$HOME/.cargo/env\""
    fi
    if is_root && ! id postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' OS user (PostgreSQL refuses to run as root); install the postgresql package"
    fi
}

# Installs the smoke client's Python packages, unless they are importable already.
ensure_python_deps() {
    command -v python3 >/dev/null 2>&1 || die "python3 not found (apt-get install -y python3 python3-pip)"
    if python3 -c 'import grpc, grpc_reflection' >/dev/null 2>&1; then
        return 0
    fi
    local req="$CONVOY_ROOT/infra/local/requirements.txt" out
    log "installing Python packages from infra/local/requirements.txt"
    if out="$(python3 -m pip install --quiet -r "$req" 2>&1)"; then
        [[ -n "$out" ]] && printf '%s\n' "$out" >&2
    elif grep -q 'externally-managed-environment' <<<"$out"; then
        # Debian's own python3 refuses pip installs (PEP 668); this is a throwaway dev/CI
        # machine's interpreter, so install anyway.
        log "python3 is externally managed (PEP 668): retrying with --break-system-packages"
        python3 -m pip install --quiet --break-system-packages -r "$req"
    else
        printf '%s\n' "$out" >&2
        die "pip install -r infra/local/requirements.txt failed"
    fi
    python3 -c 'import grpc, grpc_reflection' || die "grpc / grpc_reflection still not importable after pip install"
}

# The cargo-deny that deny.toml is written for (its format changes between minor versions).
CONVOY_CARGO_DENY_VERSION=0.20.2

# Installs cargo-deny $CONVOY_CARGO_DENY_VERSION with cargo install (into cargo's bin folder,
# ~/.cargo/bin by default, where it stays), unless `cargo deny` is that version already.
ensure_cargo_deny() {
    local want="$CONVOY_CARGO_DENY_VERSION" have
    have="$(cargo deny --version 2>/dev/null || true)"
    [[ "$have" == "cargo-deny $want" ]] && return 0
    log "installing cargo-deny $want (found: ${have:-none}); about 3 minutes on 2 cores"
    # Upstream's release profile (fat LTO, one codegen unit) builds in about 4.5 minutes on
    # 2 cores, without them in about 2.5; the checks still take a second or two. --force:
    # replaces a cargo-deny that cargo install did not put there itself.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo install --locked --force "cargo-deny@$want" || die "cargo install --locked cargo-deny@$want failed"
    have="$(cargo deny --version 2>/dev/null || true)"
    [[ "$have" == "cargo-deny $want" ]] ||
        die "after installing cargo-deny $want, cargo deny --version says '${have:-nothing}': is cargo's bin folder (~/.cargo/bin) on PATH, ahead of any other cargo-deny?"
}

# cargo deny's bans, licenses and sources checks against deny.toml, offline (no advisory
# database needed): the crates are fetched first, from crates.io, as cargo test would. The
# duplicate-version warnings come without their inclusion graphs; on a failure the errors are
# printed again with them, to show through what a crate came in.
cargo_deny_check() {
    local checks=(bans licenses sources)
    log "cargo fetch; cargo deny --offline check ${checks[*]}"
    cargo fetch --quiet || die "cargo fetch failed"
    if ! cargo deny --offline check --hide-inclusion-graph "${checks[@]}"; then
        cargo deny --offline --log-level error check "${checks[@]}" || true
        die "cargo deny check ${checks[*]} failed: see deny.toml for the policy"
    fi
}

# Runs a command as the postgres OS user when root, directly otherwise; from / (the
# postgres user may not be able to read the current folder) and without libpq's
# environment variables.
as_pg() {
    local unset_args=() v
    for v in "${CONVOY_PG_ENV_VARS[@]}"; do unset_args+=(-u "$v"); done
    if is_root; then
        (cd / && env "${unset_args[@]}" runuser -u postgres -- "$@")
    else
        (cd / && env "${unset_args[@]}" "$@")
    fi
}

# Runs a PostgreSQL program (by name, from pg_bin_dir) with as_pg.
pg_run() {
    local dir
    dir="$(pg_bin_dir)" || true
    [[ -n "$dir" ]] || die "PostgreSQL programs not found (apt-get install -y postgresql, or set CONVOY_PG_BIN)"
    local bin="$dir/$1"
    shift
    as_pg "$bin" "$@"
}

# Whether the postgres OS user can enter the folder $1 (always true when not root).
pg_can_enter() {
    is_root || return 0
    (cd / && runuser -u postgres -- test -x "$1" -a -r "$1")
}

# Makes $1 a folder owned by the user that runs PostgreSQL.
pg_owned_dir() {
    mkdir -p "$1"
    if is_root; then
        chown postgres:postgres "$1"
    fi
    chmod 0700 "$1"
}

# pg_root_for STATE_DIR: prints the folder that holds the clusters' data folders, as a
# path the postgres user can follow: STATE_DIR/pg, unless (as root) the postgres user
# cannot reach STATE_DIR (a repository under /root, say); then a folder under /var/tmp keyed
# by STATE_DIR, symlinked from STATE_DIR/pg so that later runs find the same data.
pg_root_for() {
    local state="$1" root="$1/pg"
    if [[ -e "$root" || -L "$root" ]] || pg_can_enter "$state"; then
        mkdir -p "$root"
        readlink -f "$root"
        return 0
    fi
    local alt
    alt="/var/tmp/convoy-pg-$(printf '%s' "$state" | cksum | cut -d' ' -f1)"
    warn "the postgres user cannot enter $state; keeping PostgreSQL data in $alt (symlinked from $root)"
    mkdir -p "$alt"
    ln -sfn "$alt" "$root"
    printf '%s\n' "$alt"
}

# The Unix socket folder for the instances under the pg root $1. Sockets live next to the
# data folders unless that path is too long for a socket name (108 bytes on Linux).
pg_socket_dir() {
    local root="$1" dir="$1/sockets"
    if ((${#dir} > 80)); then
        dir="/tmp/convoy-pgsock-$(id -u)-$(printf '%s' "$root" | cksum | cut -d' ' -f1)"
    fi
    printf '%s\n' "$dir"
}

# pg_init DATA_DIR: initdb unless DATA_DIR already holds a cluster.
pg_init() {
    local data="$1"
    if [[ -f "$data/PG_VERSION" ]]; then
        return 0
    fi
    pg_owned_dir "$(dirname "$data")"
    pg_owned_dir "$data"
    log "initdb $data"
    pg_run initdb -D "$data" -U postgres -A trust -E UTF8 --locale=C >/dev/null ||
        die "initdb failed for $data"
    # Per-start settings (port, sockets) go to convoy.conf, rewritten by pg_start.
    printf "\n# convoy: local fleet settings, rewritten at every start by infra/local\ninclude_if_exists = 'convoy.conf'\n" |
        as_pg tee -a "$data/postgresql.conf" >/dev/null
}

# pg_init_replica DATA_DIR PRIMARY_PORT: a streaming replica of the primary on
# 127.0.0.1:PRIMARY_PORT (pg_basebackup -R writes the standby settings), unless DATA_DIR
# already holds a cluster.
pg_init_replica() {
    local data="$1" primary_port="$2"
    if [[ -f "$data/PG_VERSION" ]]; then
        return 0
    fi
    pg_owned_dir "$(dirname "$data")"
    pg_owned_dir "$data"
    log "pg_basebackup of 127.0.0.1:$primary_port into $data"
    pg_run pg_basebackup -h 127.0.0.1 -p "$primary_port" -U postgres -D "$data" -R -X stream -c fast ||
        die "pg_basebackup failed for $data"
}

# Whether the cluster in DATA_DIR is running.
pg_running() {
    [[ -f "$1/postmaster.pid" ]] || return 1
    pg_run pg_ctl status -D "$1" >/dev/null 2>&1
}

# The postmaster's PID for DATA_DIR, when running.
pg_pid() {
    pg_running "$1" || return 1
    head -n1 "$1/postmaster.pid"
}

# Whether something accepts TCP connections on HOST PORT.
tcp_open() {
    local host="$1" port="$2"
    # shellcheck disable=SC2016 # $0 and $1 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" >/dev/null 2>&1
}

# Who holds local TCP port PORT, one "STATE ADDRESS by PROCESS" line per socket: listeners
# and either end of live connections (an outgoing connection takes a local port from the
# kernel's ephemeral range: a replica's walreceiver, say, may hold etcd's peer port or any
# other that lies there). TIME-WAIT sockets are left out: every server here binds with
# SO_REUSEADDR, which they do not block. Empty when the port is free, or when `ss` (iproute2)
# is missing.
port_holders() {
    local port="$1"
    command -v ss >/dev/null 2>&1 || return 0
    ss -Htanp "( sport = :$port )" 2>/dev/null | awk '
        $1 == "TIME-WAIT" { next }
        {
            who = "an unknown process"
            if (match($0, /users:\(\("[^"]*",pid=[0-9]+/)) {
                split(substr($0, RSTART + 9, RLENGTH - 9), f, /",pid=/)
                who = f[1] " (pid " f[2] ")"
            }
            print $1 " " $4 " by " who
        }'
}

# The kernel's ephemeral port range, "LOW HIGH" (Linux's default 32768 60999).
ephemeral_range() {
    cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999"
}

# require_port_free PORT WHAT SETTING: dies naming who holds 127.0.0.1's PORT (WHAT it is
# for, SETTING the variable that moves it), and warns when PORT lies in the ephemeral range,
# where any outgoing connection may take it between two starts.
require_port_free() {
    local port="$1" what="$2" setting="$3" holders low high
    holders="$(port_holders "$port")"
    if [[ -n "$holders" ]]; then
        die "port $port ($what) is taken: $(printf '%s' "$holders" | tr '\n' ';' | sed 's/;/; /g'); stop that or set $setting"
    fi
    if tcp_open 127.0.0.1 "$port"; then
        die "port $port ($what) already accepts connections; stop that or set $setting"
    fi
    read -r low high < <(ephemeral_range)
    if ((port >= low && port <= high)); then
        warn "port $port ($what) lies in the kernel's ephemeral range $low-$high, where outgoing connections may take it; $setting moves it"
    fi
}

# pg_start DATA_DIR PORT LOGFILE: starts the cluster on 127.0.0.1:PORT (if not running
# already) with pg_stat_statements preloaded when installed, creates database convoy (and
# the extension in it, for `convoyctl queries`) when missing, and waits until it accepts
# connections.
pg_start() {
    local data="$1" port="$2" logfile="$3" sock preload=""
    sock="$(pg_socket_dir "$(dirname "$data")")"
    pg_owned_dir "$sock"
    # Debian's postgresql package ships it next to the programs' folder.
    if [[ -f "$(pg_bin_dir)/../lib/pg_stat_statements.so" ]]; then
        preload="pg_stat_statements"
    fi
    if pg_running "$data"; then
        log "postgres $data already running"
    else
        require_port_free "$port" "postgres $data" CONVOY_PG_PORT_BASE
        # wal_keep_size: WAL kept for a replica that was down (without it, one stopped while
        # its primary recycled the WAL it needs never streams again).
        printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nwal_keep_size = '512MB'\nshared_preload_libraries = '%s'\n" "$port" "$sock" "$preload" |
            as_pg tee "$data/convoy.conf" >/dev/null
        mkdir -p "$(dirname "$logfile")"
        touch "$logfile"
        is_root && chown postgres:postgres "$logfile"
        log "starting postgres $data on 127.0.0.1:$port (log: $logfile)"
        if ! pg_run pg_ctl start -D "$data" -l "$logfile" -w -t 60 >/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            die "postgres $data did not start"
        fi
    fi
    local i
    for ((i = 0; i < 60; i++)); do
        pg_run pg_isready -q -h 127.0.0.1 -p "$port" -U postgres && break
        sleep 1
    done
    pg_run pg_isready -q -h 127.0.0.1 -p "$port" -U postgres ||
        die "postgres $data is not accepting connections on 127.0.0.1:$port"
    # A standby has the primary's databases, and cannot create any.
    if [[ -f "$data/standby.signal" ]]; then
        return 0
    fi
    if ! pg_run psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'convoy'" | grep -q 1; then
        log "createdb convoy on 127.0.0.1:$port"
        pg_run createdb -h 127.0.0.1 -p "$port" -U postgres convoy || die "createdb convoy failed on port $port"
    fi
    if [[ -n "$preload" ]]; then
        pg_run psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d convoy \
            -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null ||
            warn "CREATE EXTENSION pg_stat_statements failed on port $port (convoyctl queries will say why)"
    fi
}

# pg_stop DATA_DIR: fast shutdown, when running.
pg_stop() {
    local data="$1"
    [[ -f "$data/PG_VERSION" ]] || return 0
    if pg_running "$data"; then
        log "stopping postgres $data"
        pg_run pg_ctl stop -D "$data" -m fast -w -t 60 >/dev/null ||
            warn "pg_ctl stop failed for $data"
    fi
}

# Whether PID is alive (a zombie counts as gone).
pid_alive() {
    [[ -n "$1" && -r "/proc/$1/stat" ]] || return 1
    local state
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# Whether PID is alive and its command line contains WORD (guards against a reused PID).
pid_is() {
    pid_alive "$1" || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# stop_pid PID NAME [GRACE_SECONDS]: SIGTERM, wait up to GRACE (default 30) s, then SIGKILL.
stop_pid() {
    local pid="$1" name="$2" grace="${3:-30}" i
    if pid_alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            warn "$name (pid $pid) still running after ${grace}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                pid_alive "$pid" || break
                sleep 0.1
            done
        fi
    fi
    # Reap it when it is this shell's child.
    wait "$pid" 2>/dev/null || true
}

# host_port_of ADDR: prints "HOST PORT" to probe for a listen address (0.0.0.0 -> 127.0.0.1,
# [::] -> ::1, brackets removed).
host_port_of() {
    local addr="$1" host port
    port="${addr##*:}"
    host="${addr%:*}"
    host="${host#[}"
    host="${host%]}"
    case "$host" in
    0.0.0.0 | "") host=127.0.0.1 ;;
    ::) host=::1 ;;
    esac
    printf '%s %s\n' "$host" "$port"
}

# dev_auth STATE_DIR CONVOYCTL: authorization for a local fleet. Unless the environment
# already decides it (CONVOY_NO_AUTH=true or 1: every caller is served; CONVOY_AUTH_KEYS: your
# own keys, and your own tokens in CONVOY_AUTH_TOKEN_FILE), it keeps a development key pair
# in STATE_DIR/auth (dev-1.key, and keys/dev-1.pem for the services), mints fresh tokens
# there at every start (30 days each: service.token for the services' calls to each other,
# admin.token for convoyctl, both with the fleet-wide grant that the shard map, cache
# statistics and fleet administration need; acme-writer.token for team acme's clients,
# without it) and exports
# CONVOY_AUTH_KEYS and CONVOY_AUTH_TOKEN_FILE. Sets AUTH_DIR to that folder, or to nothing
# when the environment decided. Serialized with flock: Tilt starts services concurrently.
dev_auth() {
    local state="$1" ctl="$2" role team name
    AUTH_DIR=""
    case "${CONVOY_NO_AUTH:-}" in
    "" | false | 0 | no | off) ;;
    *) return 0 ;;
    esac
    [[ -z "${CONVOY_AUTH_KEYS:-}" ]] || return 0
    AUTH_DIR="$state/auth"
    mkdir -p "$AUTH_DIR"
    chmod 0700 "$AUTH_DIR"
    (
        flock 9
        if [[ ! -f "$AUTH_DIR/dev-1.key" ]]; then
            "$ctl" token keygen --kid dev-1 --out "$AUTH_DIR" --keys "$AUTH_DIR/keys" >/dev/null ||
                die "convoyctl token keygen failed"
        fi
        for spec in service:'*':service:--fleet admin:'*':admin:--fleet writer:acme:acme-writer:; do
            IFS=: read -r role team name fleet <<<"$spec"
            "$ctl" token mint --key "$AUTH_DIR/dev-1.key" --team "$team" --role "$role" ${fleet:+"$fleet"} \
                --subject "local-$name" --ttl-hours 720 >"$AUTH_DIR/$name.token.new" ||
                die "convoyctl token mint failed"
            chmod 0600 "$AUTH_DIR/$name.token.new"
            # A rename: a service reading the file never sees half a token.
            mv -f "$AUTH_DIR/$name.token.new" "$AUTH_DIR/$name.token"
        done
    ) 9>"$AUTH_DIR/.lock"
    export CONVOY_AUTH_KEYS="$AUTH_DIR/keys"
    export CONVOY_AUTH_TOKEN_FILE="$AUTH_DIR/service.token"
}
