"""Options shared by several `prunecxr` commands (each defined once) and the small adapters
that turn the flat option values into the library's explicit arguments."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from prunecxr import PrunecxrError
from prunecxr.data.schemas import SCHEMAS

DATASETS = tuple(SCHEMAS)


def stack_options(*decorators):
    """Stack several click options into one decorator, so each option is defined once."""

    def apply(function):
        return functools.reduce(lambda f, option: option(f), reversed(decorators), function)

    return apply


experiment_option = click.option(
    "--experiment", default="prunecxr", show_default=True, help="MLflow experiment name."
)
seed_option = click.option("--seed", default=0, show_default=True, help="Random seed.")
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
# The GPU's fast path, selectable on the CPU too (CI runs it there).
runtime_options = stack_options(
    device_option,
    click.option(
        "--channels-last/--no-channels-last",
        default=None,
        help="channels_last memory layout [default: on for CUDA, off for the CPU].",
    ),
    click.option(
        "--precision",
        type=click.Choice(["auto", "bf16", "fp32"]),
        default="auto",
        show_default=True,
        help="Autocast precision; auto = bf16 on CUDA, fp32 on the CPU.",
    ),
    click.option(
        "--compile/--no-compile",
        default=None,
        help="torch.compile the model [default: on for CUDA, off for the CPU].",
    ),
    click.option(
        "--resident-data/--no-resident-data",
        default=None,
        help="Hold a split's images on the device as one uint8 tensor (streamed in batches "
        "when it does not fit) [default: on for CUDA, off for the CPU].",
    ),
)
dataset_option = click.option(
    "--dataset", type=click.Choice(DATASETS), default="nih-cxr-lt", show_default=True
)
data_options = stack_options(
    dataset_option,
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, resolve_path=True, path_type=Path),
        help="Directory the label files' image column is relative to.",
    ),
    click.option(
        "--label-dir",
        type=click.Path(file_okay=False, resolve_path=True, path_type=Path),
        help="Directory with miccai2023_<dataset>_labels_{train,val,test}.csv [default: --data-dir].",
    ),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where decoded images are cached [default: $PRUNECXR_CACHE or ~/.cache/prunecxr].",
    ),
    click.option(
        "--num-workers",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Processes decoding images for the cache.",
    ),
    click.option(
        "--preprocess",
        type=click.Choice(["default", "original"]),
        help="How pixels are made: Pillow with antialiasing, or OpenCV INTER_LINEAR as the "
        "original code [default: original for a chkpt.pt file, else default].",
    ),
    click.option(
        "--skip-bad-images",
        is_flag=True,
        help="Leave out images that cannot be read (logged as skipped_images_<split>) "
        "instead of stopping with their list.",
    ),
)
arch_option = click.option(
    "--arch",
    type=click.Choice(["resnet18", "resnet34", "resnet50"]),
    default="resnet50",
    show_default=True,
)
POSITIVE = click.IntRange(min=1)
image_size_option = click.option(
    "--image-size",
    type=POSITIVE,
    default=256,
    show_default=True,
    help="Images are resized to S x S.",
)
model_options = stack_options(
    arch_option,
    click.option(
        "--pretrained",
        help="imagenet | none | PATH to a weights file [default: imagenet; none for synthetic data].",
    ),
    image_size_option,
)
batch_size_option = click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
lr_option = click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Adam learning rate.",
)
optimization_options = stack_options(
    batch_size_option,
    lr_option,
    click.option(
        "--weight-decay",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="Adam's L2 penalty (the paper: none).",
    ),
    click.option("--max-epochs", type=POSITIVE, default=60, show_default=True),
    click.option(
        "--patience",
        type=POSITIVE,
        default=15,
        show_default=True,
        help="Early stopping on validation loss.",
    ),
)


allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Trust pickle files, which can run code when read: models logged by an older prunecxr "
    "(without model_weights.pt) and --preds-dir's files.",
)
source_options = stack_options(
    data_options,
    allow_pickle_option,
    arch_option,
    image_size_option,
    click.option(
        "--finetune-epochs",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Fine-tune after pruning (paper: 0).",
    ),
    lr_option,
    batch_size_option,
    runtime_options,
    experiment_option,
)

# Where independent jobs (seeds, batches of sweep cells) run.
executor_options = stack_options(
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Run seeds and sweep cells in this process, or as Ray tasks on a cluster.",
    ),
    click.option(
        "--ray-address",
        help="Ray cluster to use [default: $RAY_ADDRESS, else a local Ray instance].",
    ),
    click.option(
        "--cpus-per-task", default=1.0, show_default=True, help="CPUs a Ray task reserves."
    ),
    click.option(
        "--gpus-per-task",
        default=0.0,
        show_default=True,
        help="GPUs a Ray task reserves; fractions let several tasks share a GPU.",
    ),
    click.option(
        "--max-retries",
        default=2,
        show_default=True,
        help="Further attempts of a failed seed or cell (a lost node's work is retried too).",
    ),
    click.option(
        "--cells-per-task",
        default=8,
        show_default=True,
        help="Sweep cells per Ray task (one model and test set loaded per task).",
    ),
)


def executor_settings(settings: dict):
    """Pops the executor options from `settings` -> Executor."""
    from prunecxr.executor import Executor

    return Executor(
        kind=settings.pop("executor"),
        address=settings.pop("ray_address"),
        cpus_per_task=settings.pop("cpus_per_task"),
        gpus_per_task=settings.pop("gpus_per_task"),
        max_retries=settings.pop("max_retries"),
        cells_per_task=settings.pop("cells_per_task"),
    )


def default_cache_dir() -> str:
    from prunecxr.data.cache import DEFAULT_CACHE_DIR

    return str(DEFAULT_CACHE_DIR)


def cache_override(cache_dir: Path | None) -> dict:
    return {"cache_dir": str(cache_dir)} if cache_dir else {}


def train_config(*, data_dir, label_dir, pretrained, cache_dir, preprocess, **settings):
    from prunecxr.train import TrainConfig, default_pretrained

    if data_dir is None:
        raise PrunecxrError("--data-dir is required (see `prunecxr synth` for synthetic data)")
    for name, folder in (("--data-dir", data_dir), ("--label-dir", label_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise PrunecxrError(f"{name} {folder} does not exist or is not a folder")
    return TrainConfig(
        data_dir=str(data_dir),
        label_dir=str(label_dir or data_dir),
        pretrained=pretrained or default_pretrained(data_dir),
        preprocess=preprocess or "default",
        **settings,
        **cache_override(cache_dir),
    )


def given_on_command_line(settings: dict) -> dict:
    """The settings the user typed (not click defaults), to override the demo's own."""
    context = click.get_current_context()
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {k: v for k, v in settings.items() if context.get_parameter_source(k) in typed}


def parse_methods(text: str) -> list[str]:
    from prunecxr.pruning import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PrunecxrError(f"unknown method(s) {unknown or text!r}; valid: {', '.join(METHODS)}")
    return methods


def load_source_from_settings(uri: str, settings: dict, seed: int | None = None):
    from prunecxr.sources import DataSettings, load_source

    fallback = None
    if settings["data_dir"] is not None:
        fallback = DataSettings(
            settings["dataset"],
            str(settings["data_dir"]),
            str(settings["label_dir"] or settings["data_dir"]),
            settings["image_size"],
            **cache_override(settings["cache_dir"]),
            # a checkpoint file of the original study saw OpenCV's pixels
            preprocess=settings["preprocess"] or "original",
            skip_bad_images=settings["skip_bad_images"],
        )
    cache_dir = str(settings["cache_dir"]) if settings["cache_dir"] else None
    return load_source(
        uri,
        fallback=fallback,
        arch=settings["arch"],
        cache_dir=cache_dir,
        seed=seed,
        allow_pickle=settings["allow_pickle"],
    )


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


def cell_settings(settings: dict, log_model: bool):
    from prunecxr.sweep import CellSettings

    return CellSettings(
        device=settings["device"],
        channels_last=settings["channels_last"],
        precision=settings["precision"],
        compile=settings["compile"],
        resident_data=settings["resident_data"],
        batch_size=settings["batch_size"],
        log_model=log_model,
        num_workers=settings["num_workers"],
    )


def finetune_settings(settings: dict):
    from prunecxr.train import Finetune

    return Finetune(settings["finetune_epochs"], settings["lr"], settings["batch_size"])


def resume_overrides(typed: dict) -> dict:
    """The options typed with --resume, as TrainConfig overrides (paths as text)."""
    return {key: str(v) if isinstance(v, Path) else v for key, v in typed.items()}


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
    dataset_option,
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


def published_predictions(*, preds_dir, method, dataset, label_dir, data_dir):
    from prunecxr.analysis.stage import PublishedPredictions

    if label_dir is None:
        raise PrunecxrError("--preds-dir needs --label-dir (the study's label files)")
    return PublishedPredictions(dataset, preds_dir, label_dir, data_dir, method)
