#!/bin/bash
# The replica's init container: unless a clone completed on this volume, clone the primary
# with pg_basebackup (--write-recovery-conf writes standby.signal and primary_conninfo, so
# the server starts as a streaming standby); after one did, do nothing (it resumes
# streaming). It waits for the primary, which may still be starting.
set -euo pipefail
# Written after a clone completes: a clone killed halfway (its PG_VERSION already there) is
# redone, never resumed.
done_marker="$(dirname "$PGDATA")/clone-complete"
if [[ -f "$done_marker" && -s "$PGDATA/PG_VERSION" ]]; then
    echo "replica data present in $PGDATA: resuming"
    exit 0
fi
until pg_isready --host "$PRIMARY_HOST" --port 5432 --timeout 5; do
    echo "waiting for the primary at $PRIMARY_HOST"
    sleep 2
done
rm -rf "${PGDATA:?}"
PGPASSWORD="$(cat /run/secrets/postgres/replication-password)" pg_basebackup --host "$PRIMARY_HOST" --port 5432 \
    --username replicator --pgdata "$PGDATA" --wal-method=stream --write-recovery-conf \
    --checkpoint=fast --progress
chmod 0700 "$PGDATA"
sync
touch "$done_marker"
