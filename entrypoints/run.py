"""Thin launcher used by MLproject and the container: `python entrypoints/run.py COMMAND ...`.

`mlflow run -P name=value` appends undeclared parameters as `--name value`: snake_case option
names become the CLI's kebab-case ones, and an option given an empty value is dropped so the
CLI's own default applies."""

import sys

from prunecxr.cli import main


def to_cli_arguments(argv: list[str]) -> list[str]:
    arguments: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            token = token.replace("_", "-")
            has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            if has_value and argv[index + 1] == "":
                index += 2
                continue
        arguments.append(token)
        index += 1
    return arguments


if __name__ == "__main__":
    main(to_cli_arguments(sys.argv[1:]))
