"""Start the compose stack's MLflow tracking server from environment variables.

PostgreSQL holds the runs (database MLFLOW_DB_NAME) and the basic-auth users (MLFLOW_AUTH_DB),
both owned by the role MLFLOW_DB_USER that the db container creates on its first start
(docker/db/init-mlflow.sh); artifacts are served by this server from /mlflow/artifacts. Extra
arguments are passed on to `mlflow server`.

Refused at start, each with one line: a secret still the example's `change-me…` placeholder, a
well-known default password, a secret shorter than MIN_SECRET_LENGTH, two secrets that are the
same (the trainers' password as the admin's would make every trainer an admin). The trainers'
account (MLFLOW_TRACKING_USERNAME/PASSWORD, from the trainers' env file) is created or given its
current password here: not an admin, it reads every experiment and writes only those it
creates. The database password reaches `mlflow server` through its environment
(MLFLOW_BACKEND_STORE_URI), never a command line.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from urllib.parse import quote

import psycopg

SECRETS = (
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_TRACKING_PASSWORD",  # the trainers'
)
REQUIRED = ("MLFLOW_DB_USER", "MLFLOW_DB_NAME", "MLFLOW_TRACKING_USERNAME", *SECRETS)
MIN_SECRET_LENGTH = 12
# Passwords that guessing tries first (long enough to pass the length check, or the names of
# the stack's own accounts), compared ignoring case.
KNOWN_DEFAULTS = {
    "password1234",
    "password12345",
    "password123456",
    "passwordpassword",
    "changemechangeme",
    "changeme1234",
    "administrator",
    "admin1234567",
    "adminadminadmin",
    "mlflow123456",
    "mlflowmlflow",
    "postgres1234",
    "postgrespostgres",
    "123456789012",
    "1234567890123",
    "12345678901234",
    "qwertyuiop12",
    "letmein12345",
    "trainer12345",
}
DEFAULT_ALLOWED_HOSTS = "tracking,tracking:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"


def postgres_uri(database: str) -> str:
    user, password = (
        quote(os.environ[name], safe="") for name in ("MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD")
    )
    host = os.environ.get("MLFLOW_DB_HOST", "db")
    return f"postgresql://{user}:{password}@{host}:5432/{database}"


def check_database(name: str) -> None:
    """Log in to `name` as MLflow's role, or exit with one line saying why not."""
    try:
        with psycopg.connect(postgres_uri(name), connect_timeout=10) as connection:
            superuser = connection.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            if superuser.fetchone()[0]:
                print(
                    f"warning: {os.environ['MLFLOW_DB_USER']} is a PostgreSQL superuser (a "
                    f"database made before docker/db/init-mlflow.sh); see docs/tracking.md",
                    file=sys.stderr,
                )
    except psycopg.OperationalError as error:
        reason = " ".join(str(error).split())
        sys.exit(
            f"error: cannot log in to database {name} as {os.environ['MLFLOW_DB_USER']}: "
            f"{reason} (the db container creates the role and both databases on its first "
            f"start, from .env.db-role)"
        )


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
        elif value.lower() in KNOWN_DEFAULTS:
            weak.append(f"{name} is a well-known default password")
        elif len(value) < MIN_SECRET_LENGTH:
            weak.append(f"{name} is shorter than {MIN_SECRET_LENGTH} characters")
    for first, second in itertools.combinations(SECRETS, 2):
        if os.environ[first] == os.environ[second]:
            weak.append(f"{first} is the same as {second}")
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
            f"error: set {', '.join(missing)} (see .env.db-role.example, .env.tracking.example "
            f"and .env.trainer.example)"
        )
    weak = weak_secrets()
    if weak:
        sys.exit(f"error: refusing to start: {'; '.join(weak)}; e.g. `openssl rand -hex 24`")
    auth_database = os.environ.get("MLFLOW_AUTH_DB", "mlflow_auth")
    for database in (os.environ["MLFLOW_DB_NAME"], auth_database):
        check_database(database)
    ensure_trainer_account(postgres_uri(auth_database))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(postgres_uri(auth_database))
    os.environ["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(os.environ["MLFLOW_DB_NAME"])
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
