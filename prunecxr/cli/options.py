"""The CLI's options, generated from the settings specs (prunecxr/specs.py: name, type, choices,
bounds, default and help of each field), and the adapters that build specs from parsed values.
A field `foo_bar` is the option `--foo-bar`; a `bool | None` field is `--foo/--no-foo` (None:
the per-device default), a `bool` field a flag."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import click
import numpy as np

from prunecxr import PrunecxrError
from prunecxr.data.schemas import BUILTIN, get_schema, is_card_path
from prunecxr.data.synthetic import read_marker
from prunecxr.executor import Executor
from prunecxr.pruning import METHODS
from prunecxr.specs import (
    ABSOLUTE,
    CARD,
    CellSettings,
    DataSpec,
    ExecutionSpec,
    Finetune,
    ModelSpec,
    OptimSpec,
    RuntimeSpec,
    TrainConfig,
    flat_fields,
)


def stack_options(*decorators):
    """Stack several click options into one decorator."""

    def apply(function):
        return functools.reduce(lambda f, option: option(f), reversed(decorators), function)

    return apply


def option(cls, name: str):
    """The click option of field `name` of spec class `cls` (or of a spec it is composed of)."""
    field = flat_fields(cls)[name]
    meta, flag = field.metadata, "--" + name.replace("_", "-")
    help_text, default = meta["help"] or None, meta["cli_default"]
    if field.type == "bool | None":
        return click.option(f"{flag}/--no-{flag[2:]}", default=default, help=help_text)
    if field.type == "bool":
        return click.option(flag, is_flag=True, help=help_text)
    kind = _click_type(field.type, meta)
    return click.option(flag, type=kind, default=default, show_default=True, help=help_text)


def options(cls, *names: str):
    """The options of `names` (default: every field) of spec class `cls`, in field order."""
    return stack_options(*(option(cls, name) for name in names or flat_fields(cls)))


def _click_type(annotation: str, meta):
    if meta["choices"]:
        return click.Choice(meta["choices"])
    if meta["path"] == CARD:
        return DATASET
    if meta["path"]:
        return click.Path(file_okay=False, resolve_path=meta["path"] == ABSOLUTE, path_type=Path)
    low = meta["minimum"] if meta["above"] is None else meta["above"]
    if annotation == "int":
        return int if low is None else click.IntRange(min=low)
    if annotation == "float":
        return (
            float if low is None else click.FloatRange(min=low, min_open=meta["above"] is not None)
        )
    return str


class _Dataset(click.ParamType):
    """A built-in dataset's name, or a dataset card's path: read and checked, made absolute."""

    name = "|".join(BUILTIN) + "|CARD"

    def convert(self, value, param, ctx):
        value = str(value)
        if not is_card_path(value):
            if value not in BUILTIN:
                message = f"{value!r} is not one of {', '.join(BUILTIN)} nor a .yaml/.json card"
                self.fail(message, param, ctx)
            return value
        try:
            get_schema(value)
        except PrunecxrError as error:
            self.fail(str(error), param, ctx)
        return str(Path(value).resolve())


DATASET = _Dataset()
POSITIVE = click.IntRange(min=1)
data_options = options(DataSpec)
model_options = options(ModelSpec, "arch", "pretrained")
optimization_options = options(OptimSpec)
runtime_options = options(RuntimeSpec)
execution_options = options(ExecutionSpec)
seed_option = option(TrainConfig, "seed")
experiment_option = click.option(
    "--experiment", default="prunecxr", show_default=True, help="MLflow experiment name."
)
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Trust pickle files, which can run code when read: models logged by an older prunecxr "
    "(without model_weights.pt) and --preds-dir's files.",
)
# What prune and sweep take besides the model: its data (a train run's own, else these),
# fine-tuning, and how cells run.
source_options = stack_options(
    data_options,
    allow_pickle_option,
    option(ModelSpec, "arch"),
    click.option(
        "--finetune-epochs",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Fine-tune after pruning (paper: 0).",
    ),
    option(OptimSpec, "lr"),
    option(OptimSpec, "batch_size"),
    runtime_options,
    experiment_option,
)


def spec_of(cls, values: dict, **given):
    """An instance of spec class `cls` from the parsed option values it has (paths as text; an
    option left at None keeps the field's default), `given` replacing them."""
    names = {f.name for f in dataclasses.fields(cls)}
    chosen = {k: _text(v) for k, v in values.items() if k in names and v is not None}
    return cls(**{**chosen, **given})


def _text(value):
    return str(value) if isinstance(value, Path) else value


def executor_of(values: dict) -> Executor:
    return Executor(spec_of(ExecutionSpec, values))


def train_config(values: dict) -> TrainConfig:
    """The training the options describe (the label dir defaults to the data dir, pretrained
    to imagenet for real data and none for synthetic data)."""
    data_dir, label_dir = values["data_dir"], values["label_dir"]
    if data_dir is None:
        raise PrunecxrError("--data-dir is required (see `prunecxr synth` for synthetic data)")
    for name, folder in (("--data-dir", data_dir), ("--label-dir", label_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise PrunecxrError(f"{name} {folder} does not exist or is not a folder")
    pretrained = values["pretrained"] or ("none" if read_marker(Path(data_dir)) else "imagenet")
    return TrainConfig(
        data=spec_of(DataSpec, values, label_dir=str(label_dir or data_dir)),
        model=spec_of(ModelSpec, values, pretrained=pretrained),
        optim=spec_of(OptimSpec, values),
        runtime=spec_of(RuntimeSpec, values),
        seed=values["seed"],
    )


def source_data(values: dict) -> DataSpec | None:
    """The data a checkpoint file's model is evaluated on (None without --data-dir); a
    checkpoint file of the original study saw OpenCV's pixels (--preprocess original)."""
    if values["data_dir"] is None:
        return None
    label_dir = str(values["label_dir"] or values["data_dir"])
    preprocess = values["preprocess"] or "original"
    return spec_of(DataSpec, values, label_dir=label_dir, preprocess=preprocess)


def cell_settings(values: dict, log_model: bool) -> CellSettings:
    return CellSettings(
        spec_of(RuntimeSpec, values), values["batch_size"], log_model, values["num_workers"]
    )


def finetune(values: dict) -> Finetune:
    return Finetune(values["finetune_epochs"], values["lr"], values["batch_size"])


def given_on_command_line(values: dict) -> dict:
    """The values the user typed (not click defaults), to override a run's or the demo's own."""
    context = click.get_current_context()
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {k: _text(v) for k, v in values.items() if context.get_parameter_source(k) in typed}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PrunecxrError(f"unknown method(s) {unknown or text!r}; valid: {', '.join(METHODS)}")
    return methods


def parse_sparsities(text: str) -> list[float]:
    """'0:0.95:0.05' (start:stop:step, stop included) or '0,0.5,0.9' -> sorted unique floats."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            values = np.arange(start, stop + step / 2, step)
        else:
            values = np.array([float(part) for part in text.split(",") if part.strip()])
    except ValueError:
        raise PrunecxrError(
            f"bad sparsities {text!r}: use start:stop:step or a comma list"
        ) from None
    values = sorted(set(np.round(values, 6).tolist()))
    bad = [v for v in values if not 0 <= v < 1]
    if bad or not values:
        raise PrunecxrError(f"bad sparsities {text!r}: every sparsity must be in [0, 1)")
    return values


def checkpoint_seeds(uris: list[str], text: str | None) -> list[int | None]:
    """--seed/--seeds: one seed per model URI, for checkpoint files only (None: from the
    file's place in the original layout)."""
    if not text:
        return [None] * len(uris)
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise PrunecxrError(f"bad seeds {text!r}: give whole numbers, e.g. 0,1,2") from None
    if len(seeds) != len(uris):
        raise PrunecxrError(f"{len(seeds)} seeds ({text}) for {len(uris)} models: give one each")
    runs = [uri for uri in uris if uri.startswith(("runs:/", "models:/"))]
    if runs:
        raise PrunecxrError(
            f"seeds are for checkpoint files; {runs[0]} keeps the seed of its train run"
        )
    return seeds


# `analyze --preds-dir`: the original study's published prediction files.
published_options = stack_options(
    click.option(
        "--preds-dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="The original study's published {dataset}_resnet50_seed-{s}_prune-{k}.pkl files.",
    ),
    allow_pickle_option,
    click.option(
        "--method",
        type=click.Choice(["l1", "random"]),
        default="l1",
        show_default=True,
        help="What --preds-dir holds (the original wrote L1 and random pruning apart).",
    ),
    option(DataSpec, "dataset"),
    click.option(
        "--label-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Label files (with --preds-dir).",
    ),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Images, for the PIE gallery (with --preds-dir; optional).",
    ),
)
