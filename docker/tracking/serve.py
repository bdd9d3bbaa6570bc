"""Start the compose stack's MLflow tracking server from environment variables.

PostgreSQL holds the runs (database POSTGRES_DB) and the basic-auth users (database
MLFLOW_AUTH_DB, created here on first start); artifacts are served by this server from
/mlflow/artifacts. Extra arguments are passed on to `mlflow server`.

Refused at start: a secret still the example's `change-me…` placeholder or shorter than
MIN_SECRET_LENGTH. The trainers' account (MLFLOW_TRACKING_USERNAME/PASSWORD, from the trainers'
env file) is created or given its current password here: not an admin, it reads every
experiment and writes only those it creates. The database password reaches `mlflow server`
through its environment (MLFLOW_BACKEND_STORE_URI), never a command line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from urllib.parse import quote

import psycopg
from psycopg import sql

SECRETS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_TRACKING_PASSWORD",  # the trainers'
)
REQUIRED = ("POSTGRES_USER", "POSTGRES_DB", "MLFLOW_TRACKING_USERNAME", *SECRETS)
MIN_SECRET_LENGTH = 12
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


def weak_secrets() -> list[str]:
    weak = []
    for name in SECRETS:
        value = os.environ[name]
        if value.lower().startswith("change-me"):
            weak.append(f"{name} is still the example's placeholder")
        elif len(value) < MIN_SECRET_LENGTH:
            weak.append(f"{name} is shorter than {MIN_SECRET_LENGTH} characters")
    return weak


def ensure_trainer_account(auth_database_uri: str) -> None:
    """The trainers' user: created on first start, its password kept equal to the env file's."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    name, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    if name == os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"):
        sys.exit("error: MLFLOW_TRACKING_USERNAME (the trainers') must not be the admin user")
    store = SqlAlchemyStore()
    store.init_db(auth_database_uri)
    if store.has_user(name):
        store.update_user(name, password=password, is_admin=False)
    else:
        store.create_user(name, password, is_admin=False)


def main() -> None:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        sys.exit(
            f"error: set {', '.join(missing)} (see .env.tracking.example and .env.trainer.example)"
        )
    weak = weak_secrets()
    if weak:
        sys.exit(f"error: refusing to start: {'; '.join(weak)}; e.g. `openssl rand -hex 24`")
    auth_database = os.environ.get("MLFLOW_AUTH_DB", "mlflow_auth")
    ensure_database(auth_database)
    ensure_trainer_account(postgres_uri(auth_database))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(postgres_uri(auth_database))
    os.environ["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(os.environ["POSTGRES_DB"])
    command = [
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "0.0.0.0",
        "--port",
        "5000",
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
