"""Start the compose stack's MLflow tracking server from environment variables.

PostgreSQL holds the runs (database POSTGRES_DB) and the basic-auth users (database
MLFLOW_AUTH_DB, created here on first start); artifacts are served by this server from
/mlflow/artifacts. Extra arguments are passed on to `mlflow server`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from urllib.parse import quote

import psycopg
from psycopg import sql

REQUIRED = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
DEFAULT_ALLOWED_HOSTS = "tracking,tracking:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"


def postgres_uri(database: str) -> str:
    user, password = (
        quote(os.environ[name], safe="") for name in ("POSTGRES_USER", "POSTGRES_PASSWORD")
    )
    host = os.environ.get("POSTGRES_HOST", "db")
    return f"postgresql://{user}:{password}@{host}:5432/{database}"


def ensure_database(name: str) -> None:
    """CREATE DATABASE name unless it exists (PostgreSQL has no IF NOT EXISTS for databases)."""
    with psycopg.connect(postgres_uri(os.environ["POSTGRES_DB"]), autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if exists.fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def write_auth_config(database_uri: str) -> str:
    """The basic-auth app's ini file; the admin password itself stays in the environment."""
    config = (
        "[mlflow]\n"
        f"default_permission = {os.environ.get('MLFLOW_AUTH_DEFAULT_PERMISSION', 'READ')}\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a slow PBKDF2 hash; a sweep logs thousands of
        # requests. Cached checks let a changed password linger for at most a minute.
        "auth_cache_ttl_seconds = 60\n"
    )
    path = os.path.join(tempfile.mkdtemp(), "basic_auth.ini")
    with open(path, "w") as file:
        file.write(config)
    return path


def main() -> None:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        sys.exit(f"error: set {', '.join(missing)} in the env file (see .env.tracking.example)")
    auth_database = os.environ.get("MLFLOW_AUTH_DB", "mlflow_auth")
    ensure_database(auth_database)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(postgres_uri(auth_database))
    command = [
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "0.0.0.0",
        "--port",
        "5000",
        "--backend-store-uri",
        postgres_uri(os.environ["POSTGRES_DB"]),
        "--serve-artifacts",
        "--artifacts-destination",
        "/mlflow/artifacts",
        "--allowed-hosts",
        os.environ.get("MLFLOW_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS),
        *sys.argv[1:],
    ]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
