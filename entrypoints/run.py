"""Thin launcher used by MLproject and the container: `python entrypoints/run.py COMMAND --opt VALUE ...`.

MLproject parameters cannot be left unset, so an option whose value is the empty string is
dropped here and the CLI's own default applies."""

import sys

from prunecxr.cli import main


def drop_empty_options(argv: list[str]) -> list[str]:
    kept: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and "=" not in token and index + 1 < len(argv):
            value = argv[index + 1]
            if value == "":
                index += 2
                continue
            if not value.startswith("--"):
                kept += [token, value]
                index += 2
                continue
        kept.append(token)
        index += 1
    return kept


if __name__ == "__main__":
    main(drop_empty_options(sys.argv[1:]))
