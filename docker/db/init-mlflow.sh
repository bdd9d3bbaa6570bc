#!/bin/sh
# Run once by the postgres image, on the db container's first start with an empty volume
# (/docker-entrypoint-initdb.d): MLflow's own role, not a superuser, owning only its two
# databases (the runs; the basic-auth users). Over the network, only that role reaches only those
# two databases; the superuser logs in from inside the db container only.
set -eu
: "${MLFLOW_DB_USER:?}" "${MLFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_NAME:?}" "${MLFLOW_AUTH_DB:?}"
# psql reads the values from the environment (\getenv): no password on a command line.
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet -U "$POSTGRES_USER" -d postgres <<'SQL'
\getenv role MLFLOW_DB_USER
\getenv password MLFLOW_DB_PASSWORD
\getenv runs_db MLFLOW_DB_NAME
\getenv auth_db MLFLOW_AUTH_DB
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE :"runs_db" OWNER :"role";
CREATE DATABASE :"auth_db" OWNER :"role";
REVOKE ALL ON DATABASE :"runs_db", :"auth_db" FROM PUBLIC;
SQL
# pg_hba.conf: the first line that matches a connection decides.
hba="$PGDATA/pg_hba.conf"
{
    printf 'host %s,%s %s all scram-sha-256\n' "$MLFLOW_DB_NAME" "$MLFLOW_AUTH_DB" "$MLFLOW_DB_USER"
    printf 'host all all all reject\n'
    cat "$hba"
} >"$hba.new"
mv "$hba.new" "$hba"
echo "created role $MLFLOW_DB_USER owning databases $MLFLOW_DB_NAME and $MLFLOW_AUTH_DB"
