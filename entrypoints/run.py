"""Thin launcher used by MLproject and the container: `python entrypoints/run.py COMMAND ...`.

`mlflow run -P name=value` passes every parameter as `--name value` (declared ones through the
entry point's command, others appended). This turns them into the CLI's own options:
snake_case names become kebab-case; a boolean flag's value picks `--flag` or `--no-flag`
(`auto` leaves the CLI's per-device default); an empty value is dropped so the CLI's default
applies."""

import sys

try:
    import click

    from prunecxr.cli import cli, main
except ImportError as error:  # `python` on PATH is not the environment prunecxr is in
    sys.exit(
        f"error: {error} in {sys.executable}; run `mlflow run` with prunecxr's environment "
        f"active (e.g. source .venv/bin/activate) or let conda build it (no --env-manager local)"
    )

TRUE, FALSE, UNSET = ("true", "yes", "1"), ("false", "no", "0"), ("auto", "")


def to_cli_arguments(argv: list[str]) -> list[str]:
    command = cli.commands.get(argv[0]) if argv else None
    flags = _boolean_flags(command) if command else {}
    arguments: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        if not token.startswith("--") or not has_value:
            arguments.append(token.replace("_", "-") if token.startswith("--") else token)
            index += 1
            continue
        name, value = token.replace("_", "-"), argv[index + 1]
        if name in flags:
            arguments += _flag_arguments(name, value, flags[name])
        elif value != "":
            arguments += [name, value]
        index += 2
    return arguments


def _boolean_flags(command: click.Command) -> dict[str, click.Option]:
    return {
        opt: param
        for param in command.params
        if isinstance(param, click.Option) and param.is_flag
        for opt in param.opts
    }


def _flag_arguments(name: str, value: str, option: click.Option) -> list[str]:
    """`--log-models true` -> ["--log-models"]; `false` -> ["--no-log-models"] or nothing."""
    text = value.strip().lower()
    if text in UNSET:
        return []
    if text not in TRUE + FALSE:
        raise SystemExit(f"error: {name} takes true, false or auto, not {value!r}")
    wanted = text in TRUE
    if wanted:
        return [option.opts[0]]
    return option.secondary_opts[:1] if option.secondary_opts else []


if __name__ == "__main__":
    main(to_cli_arguments(sys.argv[1:]))
