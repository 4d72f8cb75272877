#!/usr/bin/env bash
# Runs a command (a `convoyctl bench` run, say) and reports the CPU this machine's fleet
# processes spent meanwhile, by kind (conversation, cache, shard-router, analytics, every
# postgres process together, redis-server, etcd, convoyctl) in cores (CPU seconds per wall
# second), so a run's throughput can be read per core. Processes that start or end during
# the command count only for the part of it they were seen in.
#
#   infra/local/cpu-during.sh target/release/convoyctl ... bench --scenario get --clients 64
set -euo pipefail

snapshot() {
    # kind, pid, utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat).
    local stat comm rest
    for stat in /proc/[0-9]*/stat; do
        { read -r stat_line < "$stat"; } 2> /dev/null || continue
        comm=${stat_line#*(}
        comm=${comm%%)*}
        case "$comm" in
        conversation | cache | shard-router | analytics | postgres | redis-server | etcd | convoyctl) ;;
        *) continue ;;
        esac
        rest=${stat_line##*) }
        # shellcheck disable=SC2086
        set -- $rest
        echo "$comm ${stat#/proc/} $((${12} + ${13}))"
    done
}

before=$(snapshot)
started=$(date +%s.%N)
status=0
"$@" || status=$?
ended=$(date +%s.%N)
after=$(snapshot)

python3 - "$started" "$ended" "$(getconf CLK_TCK)" <<PY
import sys, collections
started, ended, tck = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def parse(text):
    return {(k, p): int(t) for k, p, t in (line.split() for line in text.splitlines() if line)}
before, after = parse("""$before"""), parse("""$after""")
spent = collections.Counter()
for key, ticks in after.items():
    spent[key[0]] += ticks - before.get(key, 0)
wall = ended - started
print(f"fleet CPU during the command ({wall:.1f} s wall, in cores):")
for kind, ticks in sorted(spent.items(), key=lambda kv: -kv[1]):
    print(f"  {kind:<14} {ticks / tck / wall:5.2f}")
print(f"  {'all':<14} {sum(spent.values()) / tck / wall:5.2f}")
PY
exit "$status"
