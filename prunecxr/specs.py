"""Every setting of every stage, once: small frozen dataclasses composed per stage, each field
with its default and help as metadata (docs/ARCHITECTURE.md, "Settings").

The CLI's options (prunecxr/cli/options.py) are generated from these fields, MLproject's
parameters are checked against them (tests/test_specs.py), and a stage's key — what it computes,
so that running it again continues it — is derived from each field's `role`:

- WHAT: changes what is computed; part of every key, fixed when a run is resumed.
- RESUMABLE: how long a training runs and where its data is; may change when a train run is
  resumed (so not in the train key), but part of the study key.
- WHERE: where and how fast (device, layout, cache); in no key, may always change.

A new switch is one field here and the code that reads it."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from prunecxr import PrunecxrError
from prunecxr.data.cache import DEFAULT_CACHE_DIR, PREPROCESS
from prunecxr.data.schemas import BUILTIN, DatasetSchema, card_key, get_schema

WHAT, RESUMABLE, WHERE = "what", "resumable", "where"
ABSOLUTE, AS_TYPED, CARD = "absolute", "as typed", "dataset card"
ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "densenet121", "vit_b_16")  # models.ARCHS
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32", "tf32")
PROTOCOLS = ("default", "original")  # docs/training.md, "The original protocol"
EXECUTORS = ("local", "ray")
_SAME = object()  # the CLI's default is the field's


def setting(
    default: Any,
    help: str = "",
    *,
    role: str = WHAT,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    above: float | None = None,
    cli_default: Any = _SAME,
    path: str | None = None,
    keyed_unless_default: bool = False,
) -> Any:
    """A settings field. `minimum`/`above`: the smallest allowed value (inclusive/exclusive).
    `cli_default`: the option's default where it is resolved later (None: "[default: ...]" in
    `help` says how). `path`: a folder, ABSOLUTE (made absolute on the command line) or AS_TYPED;
    CARD: a built-in dataset's name or a card file (made absolute; keyed by its content).
    `keyed_unless_default`: a setting added after runs were first keyed: left out of keys at its
    default (what every older run used), so their keys stay the same."""
    metadata = dict(
        help=help,
        role=role,
        choices=choices,
        minimum=minimum,
        above=above,
        cli_default=default if cli_default is _SAME else cli_default,
        path=path,
        keyed_unless_default=keyed_unless_default,
    )
    return field(default=default, metadata=metadata)


def where(default: Any, help: str = "", **metadata) -> Any:
    """A setting of where and how fast (role WHERE)."""
    return setting(default, help, role=WHERE, **metadata)


@dataclass(frozen=True)
class DataSpec:
    """Which data, where it is, and how its pixels are made."""

    dataset: str = setting(
        "nih-cxr-lt",
        f"{' | '.join(BUILTIN)} | PATH of a dataset card (.yaml or .json; docs/datasets.md).",
        path=CARD,
    )
    data_dir: str = setting(
        "",
        "Directory the label files' image column is relative to.",
        role=RESUMABLE,
        path=ABSOLUTE,
        cli_default=None,
    )
    label_dir: str = setting(
        "",
        "Directory with miccai2023_<dataset>_labels_{train,val,test}.csv [default: --data-dir].",
        role=RESUMABLE,
        path=ABSOLUTE,
        cli_default=None,
    )
    image_size: int = setting(256, "Images are resized to S x S.", minimum=1)
    preprocess: str = setting(
        "default",
        "How pixels are made: Pillow with antialiasing, or OpenCV INTER_LINEAR as the original "
        "code [default: original for a chkpt.pt file, else default].",
        choices=PREPROCESS,
        cli_default=None,
    )
    skip_bad_images: bool = setting(
        False,
        "Leave out images that cannot be read (logged as skipped_images_<split>) instead of "
        "stopping with their list.",
        role=RESUMABLE,
    )
    cache_dir: str = where(
        str(DEFAULT_CACHE_DIR),
        "Where decoded images are cached [default: $PRUNECXR_CACHE or ~/.cache/prunecxr].",
        path=AS_TYPED,
        cli_default=None,
    )
    num_workers: int = where(0, "Processes decoding images for the cache.", minimum=0)

    def schema(self) -> DatasetSchema:
        """The dataset's card, with its classes (a card may take them from the train file)."""
        return get_schema(self.dataset, self.label_dir or self.data_dir or None)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = setting("resnet50", choices=ARCH_NAMES)
    pretrained: str = setting(
        "imagenet",
        "imagenet | none | PATH to a weights file [default: imagenet; none for synthetic data].",
        cli_default=None,
    )


@dataclass(frozen=True)
class OptimSpec:
    batch_size: int = setting(256, minimum=1)
    lr: float = setting(1e-4, "Adam learning rate.", above=0)
    weight_decay: float = setting(
        0.0, "Adam's L2 penalty (the paper: none).", minimum=0, keyed_unless_default=True
    )
    max_epochs: int = setting(60, minimum=1, role=RESUMABLE)
    patience: int = setting(15, "Early stopping on validation loss.", minimum=1, role=RESUMABLE)
    protocol: str = setting(
        "default",
        "original: train as the code behind the paper's checkpoints did (fp32 with TF32 "
        "convolutions, BatchNorm frozen after epoch 1, one more stale epoch, nearest-neighbour "
        "rotation, validation loss averaged over batches).",
        choices=PROTOCOLS,
        keyed_unless_default=True,
    )


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how fast a model runs; None and "auto" are resolved per device
    (prunecxr/runtime.py): the GPU's fast path on CUDA, none of it on the CPU."""

    device: str = where("auto", choices=DEVICES)
    channels_last: bool | None = where(
        None, "channels_last memory layout [default: on for CUDA, off for the CPU]."
    )
    precision: str = where(
        "auto",
        "bf16: autocast; fp32: strict; tf32: fp32 with TF32 convolutions (PyTorch 1.13's "
        "default). auto = bf16 on CUDA, fp32 on the CPU; tf32 when training --protocol original.",
        choices=PRECISIONS,
    )
    compile: bool | None = where(
        None, "torch.compile the model [default: on for CUDA, off for the CPU]."
    )
    resident_data: bool | None = where(
        None,
        "Hold a split's images on the device as one uint8 tensor (streamed in batches when it "
        "does not fit) [default: on for CUDA, off for the CPU].",
    )
    cudnn_benchmark: bool | None = where(
        None,
        "Let cuDNN time its convolution kernels once per input shape and keep the fastest "
        "[default: on for CUDA, off for the CPU].",
    )


@dataclass(frozen=True)
class ExecutionSpec:
    """Where independent jobs (seeds, batches of sweep cells) run (prunecxr/executor.py)."""

    executor: str = where(
        "local",
        "Run seeds and sweep cells in this process, or as Ray tasks on a cluster.",
        choices=EXECUTORS,
    )
    ray_address: str | None = where(
        None, "Ray cluster to use [default: $RAY_ADDRESS, else a local Ray instance]."
    )
    # Their bounds are checked by executor.Executor, for the CLI and the library alike.
    cpus_per_task: float = where(1.0, "CPUs a Ray task reserves.")
    gpus_per_task: float = where(
        0.0, "GPUs a Ray task reserves; fractions let several tasks share a GPU."
    )
    max_retries: int = where(
        2, "Further attempts of a failed seed or cell (a lost node's work is retried too)."
    )
    cells_per_task: int = where(
        8, "Sweep cells per Ray task (one model and test set loaded per task)."
    )


GROUPS = (DataSpec, ModelSpec, OptimSpec, RuntimeSpec)


@dataclass(frozen=True)
class TrainConfig:
    """Resolved settings of one training run. Logged as params and stored in every checkpoint
    flat (one name per setting: `flat()`), as runs and checkpoints have always had them."""

    data: DataSpec
    model: ModelSpec = ModelSpec()
    optim: OptimSpec = OptimSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    seed: int = setting(0, "Random seed.")

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """From flat settings (a checkpoint's, the CLI's); a setting not given has its default."""
        unknown = set(values) - set(flat_fields(cls))
        if unknown:
            raise PrunecxrError(f"unknown settings: {', '.join(sorted(unknown))}")
        groups = {
            name: group(**{k: v for k, v in values.items() if k in _names(group)})
            for name, group in _group_fields(cls).items()
        }
        return cls(**groups, **{k: v for k, v in values.items() if k in _names(cls)})

    def flat(self) -> dict[str, Any]:
        return flatten(self)

    def replace(self, **values) -> TrainConfig:
        """A copy with flat settings replaced."""
        return TrainConfig.from_flat(**{**self.flat(), **values})


@dataclass(frozen=True)
class CellSettings:
    """How the cells of a prune or sweep stage run."""

    runtime: RuntimeSpec = RuntimeSpec()  # precision "auto" is fp32 here: analysis-grade
    batch_size: int = 256
    log_model: bool = False  # sweeps keep only metrics and predictions per cell
    num_workers: int = 0  # processes decoding images if the test-set cache must be built

    @classmethod
    def like_training(cls, train: TrainConfig) -> CellSettings:
        """Cells that run where and how a training ran (device, layout, precision, batch)."""
        return cls(train.runtime, train.optim.batch_size, num_workers=train.data.num_workers)


@dataclass(frozen=True)
class Finetune:
    """Optional fine-tuning after pruning (0 epochs = the paper's setting)."""

    epochs: int = 0
    lr: float = 1e-4
    batch_size: int = 256


_GROUP_NAMES = {group.__name__: group for group in GROUPS}  # field types are names (annotations)


def _group_fields(cls) -> dict[str, type]:
    """{field name: spec class} of the fields of `cls` that are spec groups."""
    return {f.name: _GROUP_NAMES[f.type] for f in dataclasses.fields(cls) if f.type in _GROUP_NAMES}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type not in _GROUP_NAMES}


def flat_fields(cls) -> dict[str, dataclasses.Field]:
    """{name: field} of `cls` and of the spec groups it is composed of, flattened."""
    fields = {}
    for f in dataclasses.fields(cls):
        if f.type in _GROUP_NAMES:
            fields.update(flat_fields(_GROUP_NAMES[f.type]))
        else:
            fields[f.name] = f
    return fields


def flatten(settings) -> dict[str, Any]:
    """A composed settings object's values, one name per setting."""
    values = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        values.update(flatten(value) if f.type in _GROUP_NAMES else {f.name: value})
    return values


def names_with_role(cls, *roles: str) -> tuple[str, ...]:
    return tuple(n for n, f in flat_fields(cls).items() if f.metadata.get("role") in roles)


def keyed_settings(settings, *, exclude_roles: tuple[str, ...]) -> dict[str, Any]:
    """The settings a key identifies: all but those of `exclude_roles`, and a setting added
    after runs were first keyed left out at its default (their keys stay the same)."""
    fields = flat_fields(type(settings))
    return {
        name: card_key(value) if fields[name].metadata.get("path") == CARD else value
        for name, value in flatten(settings).items()
        if fields[name].metadata.get("role") not in exclude_roles
        and not (
            fields[name].metadata.get("keyed_unless_default") and value == fields[name].default
        )
    }


def digest(value: Any) -> str:
    """A short stable key of `value` (its repr): 16 hex digits of SHA-256."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def train_key(config: TrainConfig) -> str:
    """Identifies a training by what it computes (not where, how fast, or for how long)."""
    fixed = keyed_settings(config, exclude_roles=(RESUMABLE, WHERE))
    return digest(sorted(fixed.items()))
