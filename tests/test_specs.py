"""Settings are defined once (prunecxr/specs.py): the CLI's options and MLproject's parameters
agree with them, and keys come from them."""

from __future__ import annotations

import dataclasses

import click
import pytest
import yaml

from prunecxr import PrunecxrError
from prunecxr.cli import cli
from prunecxr.models import ARCHS
from prunecxr.specs import (
    RESUMABLE,
    WHERE,
    DataSpec,
    ExecutionSpec,
    ModelSpec,
    OptimSpec,
    RuntimeSpec,
    TrainConfig,
    flat_fields,
    names_with_role,
    train_key,
)
from tests.helpers import PROJECT_ROOT

SPECS = (DataSpec, ModelSpec, OptimSpec, RuntimeSpec, ExecutionSpec)
FIELDS = {name: field for spec in SPECS for name, field in flat_fields(spec).items()}
ENTRY_COMMANDS = {"main": "study", "train": "train", "prune": "prune", "sweep": "sweep"}


def _options(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}


def _mlproject() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]


@pytest.mark.parametrize("command", ["train", "study", "prune", "sweep"])
def test_cli_options_are_the_specs_fields(command):
    """Every option named like a spec field has the field's default, choices and help."""
    options = _options(command)
    shared = [name for name in options if name in FIELDS]
    assert {"dataset", "data_dir", "device", "channels_last", "precision"} <= set(shared)
    for name in shared:
        option, meta = options[name], FIELDS[name].metadata
        if FIELDS[name].type == "bool":
            assert option.is_flag and option.opts == ["--" + name.replace("_", "-")], name
            continue
        assert option.default == meta["cli_default"], name
        assert option.help == (meta["help"] or None), name
        if meta["choices"]:
            assert tuple(option.type.choices) == meta["choices"], name
        if FIELDS[name].type == "bool | None":
            assert option.secondary_opts == ["--no-" + name.replace("_", "-")], name


def test_every_runtime_switch_is_an_option_of_every_command_that_runs_a_model():
    for command in ("train", "study", "prune", "sweep"):
        assert set(flat_fields(RuntimeSpec)) <= set(_options(command)), command


def _same(declared: str, default) -> bool:
    if default is None:
        return declared == "auto"
    if isinstance(default, bool):
        return declared == str(default).lower()
    if isinstance(default, (int, float)):
        return float(declared) == float(default)
    return declared == default


def test_mlproject_parameters_are_the_cli_options_with_their_defaults():
    """An entry point declares its command's options by their snake_case names, with the
    option's default (auto: the per-device default of a bool | None switch)."""
    for entry, spec in _mlproject().items():
        command = ENTRY_COMMANDS.get(entry, entry)
        assert f"entrypoints/run.py {command} " in spec["command"] + " ", entry
        options = _options(command)
        for name, parameter in spec.get("parameters", {}).items():
            assert name in options, f"MLproject {entry}: {name} is no option of {command}"
            assert "{" + name + "}" in spec["command"], f"MLproject {entry}: {name} unused"
            if "default" in parameter:
                declared = str(parameter["default"])
                assert _same(declared, options[name].default), f"{entry}: {name}={declared}"


def test_mlproject_declares_every_runtime_switch():
    """`mlflow run -P precision=bf16` works on every entry point that runs a model."""
    entry_points = _mlproject()
    for entry in ENTRY_COMMANDS:
        declared = set(entry_points[entry]["parameters"])
        assert set(flat_fields(RuntimeSpec)) <= declared, entry


def test_arch_choices_are_the_models_there_are():
    assert set(FIELDS["arch"].metadata["choices"]) == set(ARCHS)


def test_keys_come_from_the_fields_roles():
    resumable = set(names_with_role(TrainConfig, RESUMABLE, WHERE))
    assert set(flat_fields(RuntimeSpec)) <= resumable
    assert {"max_epochs", "patience", "data_dir", "label_dir", "cache_dir"} <= resumable
    assert not {"arch", "lr", "seed", "dataset", "image_size"} & resumable
    config = TrainConfig.from_flat(dataset="nih-cxr-lt", data_dir="/d", label_dir="/d")
    for name in resumable:
        other = {"device": "cpu", "precision": "fp32"}.get(name, _other(FIELDS[name].default))
        assert train_key(config.replace(**{name: other})) == train_key(config), name
    assert train_key(config.replace(lr=1e-3)) != train_key(config)


def _other(value):
    if isinstance(value, bool) or value is None:
        return True
    return value + 1 if isinstance(value, (int, float)) else f"{value}-moved"


def test_flat_settings_round_trip_and_unknown_ones_are_refused():
    config = TrainConfig.from_flat(dataset="mimic-cxr-lt", data_dir="/d", label_dir="/l", seed=3)
    assert TrainConfig.from_flat(**config.flat()) == config
    assert config.flat()["seed"] == 3 and config.data.label_dir == "/l"
    assert set(config.flat()) == {
        f.name for spec in SPECS[:4] for f in dataclasses.fields(spec)
    } | {"seed"}
    with pytest.raises(PrunecxrError, match="unknown settings: colour"):
        TrainConfig.from_flat(colour="red")
