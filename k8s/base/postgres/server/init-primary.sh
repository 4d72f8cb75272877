#!/bin/bash
# Runs once, when the postgres image initialises an empty primary (docker-entrypoint-initdb.d):
# the role replicas stream as, its pg_hba entry, and pg_stat_statements for `convoyctl queries`.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=password="$(cat /run/secrets/postgres/replication-password)" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
