"""The Docker image and the compose stack, for real: a Docker daemon builds and runs them.

The images are built by ci/docker/build.sh on local stand-in base images (public registries are
unreachable here; building them needs root and debootstrap). Opt in with PRUNECXR_DOCKER_TESTS=1
and a running daemon (`bash ci/docker/daemon.sh`); .ci/run does both.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.helpers import PROJECT_ROOT, free_port, wait_for, wait_until_ok

IMAGE = "prunecxr:ci"
TINY_STUDY = (
    "study",
    "--seeds",
    "1",
    "--max-epochs",
    "1",
    "--methods",
    "l1",
    "--sparsities",
    "0,0.9",
)
STUDY_STAGES = ["analyze", "prune", "prune", "study", "sweep", "train"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("PRUNECXR_DOCKER_TESTS") != "1",
        reason="set PRUNECXR_DOCKER_TESTS=1 with dockerd running (bash ci/docker/daemon.sh)",
    ),
]


def run(
    *command: str, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`)."""
    if run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


@pytest.fixture(scope="module")
def images() -> None:
    build = run("bash", "ci/docker/build.sh", timeout=3600)
    assert build.returncode == 0, build.stdout + build.stderr


HOST_USER = "4321:4321"  # stands for `--user "$(id -u):$(id -g)"`, as the README runs the image


def host_user_outputs(tmp_path: Path) -> Path:
    """A host folder owned by HOST_USER, bind-mounted at /outputs."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.chown(outputs, 4321, 4321)
    return outputs


def runs_by_stage(client: MlflowClient, experiment: str) -> dict[str, list]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    by_stage: dict[str, list] = {}
    for found in client.search_runs([experiment_id]):
        by_stage.setdefault(found.data.tags["prunecxr.stage"], []).append(found)
    return by_stage


def assert_tiny_study_logged(client: MlflowClient, experiment: str) -> dict[str, list]:
    by_stage = runs_by_stage(client, experiment)
    assert sorted(s for s, found in by_stage.items() for _ in found) == STUDY_STAGES
    assert {found.info.status for runs in by_stage.values() for found in runs} == {"FINISHED"}
    analyze = by_stage["analyze"][0].info.run_id
    assert "report.html" in [a.path for a in client.list_artifacts(analyze)]
    return by_stage


def test_image_help_runs_as_non_root_user(images):
    result = run("docker", "run", "--rm", IMAGE, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("synth", "train", "prune", "sweep", "analyze", "study"):
        assert command in result.stdout
    uid = run("docker", "run", "--rm", "--entrypoint", "id", IMAGE, "-u")
    assert uid.returncode == 0 and uid.stdout.strip() != "0"


def test_image_says_when_outputs_are_not_writable(images, tmp_path):
    root_owned = tmp_path / "root-owned"  # 0755, owned by root: read-only for the image's user
    root_owned.mkdir(mode=0o755)
    result = run("docker", "run", "--rm", "-v", f"{root_owned}:/outputs", IMAGE, "study")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: cannot write the MLflow store sqlite:////outputs/mlflow.db: /outputs is not writable"
    ]
    # Any other write the OS refuses ends the same way: one line, exit code 1.
    synth = run(
        "docker", "run", "--rm", "-v", f"{root_owned}:/outputs", IMAGE, "synth", "--out", "x"
    )
    assert synth.returncode == 1
    assert "Traceback" not in synth.stderr  # after the progress bar, one error line
    assert synth.stderr.strip().splitlines()[-1] == (
        "error: no permission to write /outputs/x: Permission denied"
    )


def test_image_study_and_mlflow_run_log_to_host_tracking_server(images, mlflow_server, tmp_path):
    outputs = host_user_outputs(tmp_path)
    docker_run = ["docker", "run", "--rm", "--network", "host", "--user", HOST_USER]
    docker_run += ["-v", f"{outputs}:/outputs"]
    docker_run += ["-e", f"MLFLOW_TRACKING_URI={mlflow_server}"]
    study = run(*docker_run, IMAGE, *TINY_STUDY, "--experiment", "docker-image")
    assert study.returncode == 0, study.stderr[-3000:]
    assert f"{mlflow_server}/#/experiments/" in study.stdout  # where to see it: the server
    client = MlflowClient(mlflow_server)
    by_stage = assert_tiny_study_logged(client, "docker-image")
    train = by_stage["train"][0]
    assert train.data.params["data_dir"] == "/outputs/prunecxr-demo"  # written by the container
    assert (outputs / "prunecxr-demo").stat().st_uid == 4321

    # The image's MLproject through `mlflow run --env-manager local`: prunes the study's model.
    mlflow_run = [*docker_run, "--entrypoint", "mlflow", IMAGE, "run", "/opt/prunecxr"]
    mlflow_run += ["-e", "prune", "--env-manager", "local", "--experiment-name", "docker-image"]
    pruned = run(*mlflow_run, "-P", "sparsity=0.5", "-P", "method=random")
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    prune_runs = runs_by_stage(client, "docker-image")["prune"]
    new = [r for r in prune_runs if r.data.params["method"] == "random"]
    assert len(prune_runs) == 3 and len(new) == 1
    assert new[0].data.params["source_run_id"] == train.info.run_id
    assert new[0].data.metrics["achieved_sparsity"] == pytest.approx(0.5, abs=0.001)


def container_state(name: str) -> str:
    return run("docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).stdout


def test_docker_stop_ends_the_training_run_killed_within_seconds(
    images, mlflow_server, tiny_nih, tmp_path
):
    outputs = host_user_outputs(tmp_path)
    shutil.copytree(tiny_nih, outputs / "data")
    for path in [outputs / "data", *(outputs / "data").rglob("*")]:
        os.chown(path, 4321, 4321)
    name = f"prunecxr-stop-{os.getpid()}"
    docker_run = ["docker", "run", "-d", "--init", "--name", name, "--network", "host"]
    docker_run += ["--user", HOST_USER, "-v", f"{outputs}:/outputs", "-e", "OMP_NUM_THREADS=1"]
    docker_run += ["-e", f"MLFLOW_TRACKING_URI={mlflow_server}", IMAGE, "train"]
    docker_run += ["--data-dir", "/outputs/data", "--arch", "resnet18", "--image-size", "32"]
    docker_run += ["--device", "cpu", "--max-epochs", "1000", "--patience", "1000"]
    started = run(*docker_run, "--experiment", "docker-stop")
    assert started.returncode == 0, started.stderr
    client = MlflowClient(mlflow_server)
    try:

        def training() -> bool:  # an epoch logged: the run is in the middle of its work
            assert container_state(name).startswith("running"), run("docker", "logs", name).stderr
            experiment = client.get_experiment_by_name("docker-stop")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return bool(runs) and bool(runs[0].data.metrics)

        wait_for(training, timeout=300)
        before = time.monotonic()
        assert run("docker", "stop", name).returncode == 0
        stopping = time.monotonic() - before
        assert container_state(name).split() == ["exited", "143"]
        assert stopping < 8, stopping  # SIGTERM handled: not killed after docker's 10 s
    finally:
        run("docker", "rm", "-f", name)
    (train,) = client.search_runs([client.get_experiment_by_name("docker-stop").experiment_id])
    assert train.info.status == "KILLED"


@dataclass
class Stack:
    url: str
    compose: list[str]
    env: dict[str, str]
    admin_password: str
    trainer_password: str
    db_password: str  # MLflow's role
    db_superuser_password: str
    secret_key: str


ENV_FILES = {  # the env file's name (.env.NAME.example) -> the compose variable that names it
    "db": "DB_ENV_FILE",
    "db-role": "DB_ROLE_ENV_FILE",
    "tracking": "TRACKING_ENV_FILE",
    "trainer": "TRAINER_ENV_FILE",
}


def env_files(folder: Path, **secrets_: str) -> dict[str, str]:
    """The env files from their examples, each placeholder replaced as given (db_password:
    change-me-db-password); -> the compose variables that point at them."""
    variables = {}
    for name, variable in ENV_FILES.items():
        text = (PROJECT_ROOT / f".env.{name}.example").read_text()
        for placeholder, value in secrets_.items():
            text = text.replace(f"change-me-{placeholder.replace('_', '-')}", value)
        (folder / f"env.{name}").write_text(text)
        variables[variable] = str(folder / f"env.{name}")
    return variables


def stack_env(files: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **files,
        "TRACKING_PORT": str(free_port()),
        "POSTGRES_IMAGE": "prunecxr-ci/postgres:15",
        "TRACKING_IMAGE": "prunecxr-tracking:ci",
        "PRUNECXR_IMAGE": IMAGE,
    }


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    """`docker compose up tracking` with fresh credentials, shared by this module's compose
    tests (each looks only at its own experiment); torn down, volumes too, afterwards."""
    tmp_path = tmp_path_factory.mktemp("stack")
    admin, trainer, db, superuser = (secrets.token_hex(12) for _ in range(4))
    secret_key = secrets.token_hex(32)
    files = env_files(
        tmp_path,
        admin_password=admin,
        trainer_password=trainer,
        db_password=db,
        db_superuser_password=superuser,
        secret_key=secret_key,
    )
    env = stack_env(files)
    project = f"prunecxr-test-{os.getpid()}"
    compose = [*compose_command(), "-p", project, "-f", str(PROJECT_ROOT / "docker-compose.yml")]
    try:
        up = run(*compose, "up", "-d", "tracking", env=env)
        assert up.returncode == 0, up.stderr
        url = f"http://127.0.0.1:{env['TRACKING_PORT']}"
        wait_until_healthy(url, compose, env)
        yield Stack(url, compose, env, admin, trainer, db, superuser, secret_key)
    finally:
        run(*compose, "down", "--volumes", "--remove-orphans", env=env)


def wait_until_healthy(url: str, compose: list[str], env: dict, timeout: float = 180) -> None:
    if not wait_until_ok(f"{url}/health", timeout):
        logs = run(*compose, "logs", "--tail", "40", env=env).stdout
        raise AssertionError(f"tracking server not healthy after {timeout} s:\n{logs}")


def api_status(url: str, user: str | None = None, password: str | None = None) -> int:
    """HTTP status of an API request with the given basic-auth credentials (or none)."""
    handlers: list = [urllib.request.ProxyHandler({})]
    if user:
        passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        passwords.add_password(None, url, user, password)
        handlers.append(urllib.request.HTTPBasicAuthHandler(passwords))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(f"{url}/api/2.0/mlflow/experiments/search?max_results=10") as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_compose_stack_tracks_runs_in_postgres_behind_basic_auth(stack, monkeypatch, tmp_path):
    study = run(*stack.compose, "run", "--rm", "prunecxr-cpu", *TINY_STUDY, env=stack.env)
    assert study.returncode == 0, study.stderr[-3000:]

    assert api_status(stack.url) == 401
    assert api_status(stack.url, "admin", "not-the-password") == 401
    assert api_status(stack.url, "admin", stack.admin_password) == 200
    assert api_status(stack.url, "trainer", stack.trainer_password) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.admin_password)
    client = MlflowClient(stack.url)
    by_stage = assert_tiny_study_logged(client, "prunecxr")
    # Artifacts were uploaded through the server and come back through it.
    report = client.download_artifacts(by_stage["analyze"][0].info.run_id, "report.html", tmp_path)
    assert "<html" in Path(report).read_text()[:500].lower()
    # The runs live in PostgreSQL (the backend store), not in a file inside the container.
    count = run(
        *stack.compose,
        "exec",
        "-T",
        "db",
        "sh",
        "-c",
        'psql -U postgres -d "$MLFLOW_DB_NAME" -tAc "SELECT count(*) FROM runs JOIN '
        "experiments USING (experiment_id) WHERE experiments.name = 'prunecxr'\"",
        env=stack.env,
    )
    assert count.returncode == 0, count.stderr
    assert int(count.stdout.strip()) == len(STUDY_STAGES)

    # The study was logged by the trainers' own account (an experiment it made, so it may
    # write there); it may not write into an experiment someone else made, nor act as admin.
    admins = client.create_experiment("admin-only")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.trainer_password)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        MlflowClient(stack.url).create_run(admins)
    with pytest.raises(urllib.error.HTTPError, match="403"):
        api_get(stack.url, "users/get?username=admin", ("trainer", stack.trainer_password))


def test_compose_trainers_see_no_server_secret_and_no_command_line_shows_one(stack):
    env = run(
        *stack.compose,
        *("run", "--rm", "--no-deps", "--entrypoint", "env", "prunecxr-cpu"),
        env=stack.env,
    )
    assert env.returncode == 0, env.stderr
    assert "MLFLOW_TRACKING_USERNAME=trainer" in env.stdout
    for secret in (
        stack.db_password,
        stack.db_superuser_password,
        stack.admin_password,
        stack.secret_key,
    ):
        assert secret not in env.stdout
    for name in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert name not in env.stdout
    assert "MLFLOW_FLASK_SERVER_SECRET" not in env.stdout
    # The host sees every container's processes: none has a password in its command line.
    command_lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            command_lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    assert any("mlflow server" in line or "uvicorn" in line for line in command_lines)
    assert any(line.startswith("postgres -D") for line in command_lines)  # the stack's are there
    for line in command_lines:
        assert stack.db_password not in line and stack.admin_password not in line, line


def compose_exec(stack: Stack, service: str, *command: str) -> str:
    result = run(*stack.compose, "exec", "-T", service, *command, env=stack.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


PROBE = """import socket, sys
for host in sys.argv[1:]:
    try:
        socket.create_connection((host, 5432), timeout=3).close()
        print(host, "reached")
    except OSError as error:
        print(host, "unreachable:", type(error).__name__)
"""


def test_compose_db_is_reached_only_by_tracking_as_a_role_owning_only_its_databases(stack):
    # MLflow's role: no superuser, no CREATEDB/CREATEROLE; it owns MLflow's two databases only.
    psql = ("psql", "-U", "postgres", "-d", "postgres", "-tAc")
    role = compose_exec(
        stack,
        "db",
        *psql,
        "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'mlflow'",
    )
    assert role.split() == ["f|f|f"]
    owned = compose_exec(
        stack,
        "db",
        *psql,
        "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database "
        "WHERE datdba = 'mlflow'::regrole",
    )
    assert owned.split() == ["mlflow,mlflow_auth"]
    # db is on an internal network only tracking joins: the trainers cannot even resolve it,
    # nor reach its address; tracking can. The superuser cannot log in over the network.
    db_id = run(*stack.compose, "ps", "-q", "db", env=stack.env).stdout.strip()
    address = run(
        "docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", db_id
    ).stdout.strip()
    from_trainer = run(
        *stack.compose,
        *("run", "--rm", "--no-deps", "--entrypoint", "python", "prunecxr-cpu", "-c", PROBE),
        *("db", address),
        env=stack.env,
    )
    assert from_trainer.returncode == 0, from_trainer.stderr
    assert [line.split(":")[0] for line in from_trainer.stdout.splitlines()] == [
        "db unreachable",
        f"{address} unreachable",
    ]
    assert compose_exec(stack, "tracking", "python", "-c", PROBE, "db").split() == ["db", "reached"]
    superuser = run(
        *stack.compose,
        *("exec", "-T", "-e", f"PASSWORD={stack.db_superuser_password}", "tracking", "python"),
        "-c",
        "import os, psycopg; psycopg.connect(host='db', user='postgres', dbname='postgres', "
        "password=os.environ['PASSWORD'])",
        env=stack.env,
    )
    assert superuser.returncode != 0 and "pg_hba.conf rejects connection" in superuser.stderr
    # Each container holds its own secrets only.
    db_env = compose_exec(stack, "db", "env")
    assert stack.db_superuser_password in db_env and stack.db_password in db_env
    for secret in (stack.admin_password, stack.secret_key, stack.trainer_password):
        assert secret not in db_env
    assert stack.db_superuser_password not in compose_exec(stack, "tracking", "env")


def test_compose_stack_takes_a_sweep_logged_from_several_processes_at_once(stack, tmp_path):
    """bench/tracking_load.py at a tiny size (its numbers: docs/PERFORMANCE.md)."""
    out = tmp_path / "load.json"
    credentials = {
        "MLFLOW_TRACKING_USERNAME": "trainer",
        "MLFLOW_TRACKING_PASSWORD": stack.trainer_password,
    }
    load = run(
        *(sys.executable, str(PROJECT_ROOT / "bench" / "tracking_load.py"), "--processes", "3"),
        *("--cells", "2", "--test-images", "300", "--out", str(out)),
        env={**os.environ, "MLFLOW_TRACKING_URI": stack.url, **credentials},
    )
    assert load.returncode == 0, load.stderr[-3000:]
    (result,) = json.loads(out.read_text())["runs"]
    assert (result["processes"], result["runs"], result["complete_runs"]) == (3, 6, 6)
    assert result["all_arrived"] and result["cells_per_s"] > 0


def test_compose_tracking_server_refuses_placeholder_and_short_secrets(images, tmp_path):
    compose = [*compose_command(), "-p", f"prunecxr-refuse-{os.getpid()}"]
    compose += ["-f", str(PROJECT_ROOT / "docker-compose.yml")]
    env = os.environ
    cases = {  # what the env files hold -> what the error names
        "placeholders": ({}, "MLFLOW_DB_PASSWORD is still the example's placeholder"),
        "short": (
            dict(admin_password="short", trainer_password="a" * 16, db_password="b" * 16),
            "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12 characters",
        ),
        "known default": (
            dict(admin_password="Password1234", trainer_password="a" * 16, db_password="b" * 16),
            "MLFLOW_AUTH_ADMIN_PASSWORD is a well-known default password",
        ),
        "admin as trainer": (
            dict(admin_password="a" * 16, trainer_password="a" * 16, db_password="b" * 16),
            "MLFLOW_AUTH_ADMIN_PASSWORD is the same as MLFLOW_TRACKING_PASSWORD",
        ),
    }
    try:
        for name, (values, says) in cases.items():
            folder = tmp_path / name
            folder.mkdir()
            env = stack_env(env_files(folder, secret_key="c" * 32, **values))
            started = run(*compose, "run", "--rm", "--no-deps", "tracking", env=env)
            assert started.returncode != 0, name
            assert "error: refusing to start: " in started.stderr and says in started.stderr
            errors = [line for line in started.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1, started.stderr  # one line, whatever was wrong
    finally:
        run(*compose, "down", "--volumes", "--remove-orphans", env=env)


def api_get(url: str, path: str, credentials: tuple[str, str]) -> dict:
    passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    passwords.add_password(None, url, *credentials)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPBasicAuthHandler(passwords)
    )
    with opener.open(f"{url}/api/2.0/mlflow/{path}") as response:
        return json.load(response)


def test_compose_file_reserves_gpus_and_binds_the_ui_to_localhost():
    examples = {variable: f".env.{name}.example" for name, variable in ENV_FILES.items()}
    env = {**os.environ, **{key: str(PROJECT_ROOT / path) for key, path in examples.items()}}
    config = run(
        *compose_command(), "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", env=env
    )
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    devices = services["prunecxr"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["prunecxr-cpu"]
    trainer_env = services["prunecxr"]["environment"]
    assert trainer_env["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert trainer_env["MLFLOW_TRACKING_USERNAME"] == "trainer"
    assert not {"POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"} & set(trainer_env)
    port = services["tracking"]["ports"][0]
    published = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
    assert published.startswith("127.0.0.1:5000")
    assert services["tracking"]["depends_on"]["db"]["condition"] == "service_healthy"
    # SIGTERM reaches the trainers and the server through an init; db only on its network.
    assert all(services[name]["init"] for name in ("prunecxr", "prunecxr-cpu", "tracking"))
    assert set(services["db"]["networks"]) == {"db"}
    assert set(services["tracking"]["networks"]) == {"db", "default"}
    assert "networks" not in services["prunecxr"] or "db" not in services["prunecxr"]["networks"]
    assert yaml.safe_load(config.stdout)["networks"]["db"]["internal"] is True
