"""The study stage: the whole pipeline as one `study` run with nested stage runs
(docs/ARCHITECTURE.md, "The run tree"): train (a run per seed) -> sweep -> analyze.

With no data given, the demo: synthetic NIH-CXR-LT (drawn at 48 px, trained at 32 px) and a
ResNet18, sized to finish within 10 minutes on a 2-core CPU and to show the paper's findings
(docs/demo.md: what was measured with each choice)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunecxr import PrunecxrError, tracking
from prunecxr.data import SPLITS, get_schema
from prunecxr.data.synthetic import read_marker, write_synthetic
from prunecxr.executor import Executor, WorkerContext, check_readable
from prunecxr.sources import load_source
from prunecxr.specs import WHERE, CellSettings, TrainConfig, digest, keyed_settings
from prunecxr.stages.analyze import analyze_sweep
from prunecxr.stages.kernel import Stage, finished_run, run_stage
from prunecxr.stages.prune import run_sweep, sweep_key
from prunecxr.stages.train import train_or_continue
from prunecxr.tracking import ownership

# The demo's data and model (docs/demo.md says what each choice was measured against).
DEMO_SPLIT_SIZES = {"train": 4000, "val": 300, "test": 2000}
# Rare classes: at least 60 training examples (fewer stayed near chance: nothing to forget) and
# 15 test positives of 2,000, so that their AP change at 0.95 can follow frequency.
DEMO_MIN_POSITIVES = {"train": 60, "val": 3, "test": 15}
# Drawn larger than trained on, as real radiographs are: resizing averages the pixel noise.
DEMO_DRAW_SIZE = 48
DEMO_TRAIN = dict(
    arch="resnet18",  # ResNet50's depth buys nothing on small synthetic signs
    pretrained="none",  # no ImageNet download offline; synthetic signs are learned from scratch
    image_size=32,
    batch_size=64,
    lr=1e-3,  # from scratch, 1e-4 needs many more epochs
    # Without it, weights the data never uses (at 32 px most of layer4's kernel taps see only
    # padding) keep their initial size and global L1 removes used ones beside them.
    weight_decay=3e-6,
    max_epochs=20,
    patience=20,  # the best weights (lowest validation loss) are kept either way
)
DEMO_SEEDS = 2
# Dense where k20s fall; 0.97, past the paper's grid, so the commonest classes' k20 is not empty.
DEMO_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97)
PAPER_METHODS = ("l1", "random")
PAPER_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95
PAPER_SEEDS = 30


@dataclass(frozen=True)
class StudyConfig:
    train: TrainConfig
    seeds: tuple[int, ...] = tuple(range(PAPER_SEEDS))
    methods: tuple[str, ...] = PAPER_METHODS
    sparsities: tuple[float, ...] = PAPER_SPARSITIES


def demo_config(demo_dir: Path, dataset: str = "nih-cxr-lt", **overrides) -> StudyConfig:
    """The demo study's settings; `overrides` replace TrainConfig fields (e.g. device)."""
    train = TrainConfig.from_flat(
        dataset=dataset, data_dir=str(demo_dir), label_dir=str(demo_dir), **DEMO_TRAIN
    )
    return StudyConfig(
        train.replace(**overrides),
        seeds=tuple(range(DEMO_SEEDS)),
        methods=("l1", "random", "structured"),
        sparsities=DEMO_SPARSITIES,
    )


def ensure_demo_data(demo_dir: Path, dataset: str = "nih-cxr-lt", seed: int = 0) -> None:
    """Generate the demo's synthetic data (from `seed`) once; reuse it on later runs."""
    schema = get_schema(dataset)
    marker = read_marker(demo_dir)
    if marker and all((demo_dir / schema.label_file(s)).exists() for s in SPLITS):
        if marker.get("seed", 0) != seed:
            raise PrunecxrError(
                f"{demo_dir} holds the demo data of seed {marker.get('seed', 0)}, not {seed}; "
                f"pass another --demo-dir"
            )
        _check_demo_recipe(demo_dir, marker)
        return
    if demo_dir.exists() and any(demo_dir.iterdir()):
        raise PrunecxrError(
            f"{demo_dir} exists and is not a complete {dataset} synthetic dataset; "
            f"remove it or pass another --demo-dir"
        )
    write_synthetic(
        schema,
        demo_dir,
        DEMO_SPLIT_SIZES,
        image_size=DEMO_DRAW_SIZE,
        seed=seed,
        min_positives=DEMO_MIN_POSITIVES,
    )


def _check_demo_recipe(demo_dir: Path, marker: dict) -> None:
    """Data an older demo drew (another size, split sizes or minimum positives) would not give
    the findings docs/demo.md reports: say so instead of reusing it."""
    drawn = {
        "image size": (marker.get("image_size"), DEMO_DRAW_SIZE),
        "split sizes": (marker.get("split_sizes"), DEMO_SPLIT_SIZES),
        "minimum positives": (marker.get("min_positives"), DEMO_MIN_POSITIVES),
    }
    differ = [name for name, (found, wanted) in drawn.items() if found != wanted]
    if differ:
        raise PrunecxrError(
            f"{demo_dir} holds demo data drawn by an older prunecxr (another "
            f"{', '.join(differ)}); remove it or pass another --demo-dir"
        )


def study_key(config: StudyConfig) -> str:
    """Identifies a study by what it computes (not where or how fast), so that running the same
    command again continues it."""
    train = keyed_settings(config.train, exclude_roles=(WHERE,))
    return digest((sorted(train.items()), config.seeds, config.methods, config.sparsities))


def run_study(
    config: StudyConfig, executor: Executor = Executor(), *, allow_pickle: bool = False
) -> str:
    """study -> train (one nested run per seed) -> sweep -> analyze, all nested. An unfinished
    study of the same settings is continued: finished train runs are reused, unfinished ones
    resumed from their checkpoints, the sweep skips finished cells, analysis runs once.
    `allow_pickle`: models reused from an older prunecxr (no weights file) may be unpickled."""
    train = config.train
    params = {
        "dataset": train.data.dataset,
        "arch": train.model.arch,
        "image_size": train.data.image_size,
        "seeds": ",".join(map(str, config.seeds)),
        "methods": ",".join(config.methods),
        "protocol": train.optim.protocol,
    }
    stage = Stage(
        "study", f"study-{train.data.schema().name}", key=study_key(config), params=params
    )
    return run_stage(stage, lambda study_id, _: _study(study_id, config, executor, allow_pickle))


def _study(study_id: str, config: StudyConfig, executor: Executor, allow_pickle: bool) -> None:
    context = WorkerContext.here()
    train_ids = executor.run_all(
        seed_training_job,
        [(context, study_id, config.train.replace(seed=seed)) for seed in config.seeds],
        [f"seed {seed}" for seed in config.seeds],
    )
    ownership.ensure_mine(study_id)  # taken over: its new owner sweeps
    sweep_id = _sweep(study_id, config, train_ids, executor, allow_pickle)
    ownership.ensure_mine(study_id)
    if not tracking.finished_children(study_id, "analyze"):  # analysis runs once per study
        analyze_sweep(sweep_id, allow_pickle=allow_pickle)


def seed_training_job(context: WorkerContext, study_id: str, train: TrainConfig) -> str:
    """A job: the study's train run of one seed, reused when finished, resumed from its last
    checkpoint when not, trained when there is none. A study finds its runs by seed (its
    runs from before trainings were keyed have no key)."""
    context.enter()
    check_readable(train.data.data_dir, train.data.label_dir)
    runs = tracking.children(study_id, "train")
    mine = [
        (run_id, status) for run_id, status, params in runs if params.get("seed") == str(train.seed)
    ]
    return train_or_continue(train, study_id, candidates=mine)


def _sweep(
    study_id: str, config: StudyConfig, train_ids: list[str], executor: Executor, allow_pickle
) -> str:
    """The study's finished sweep if it has one, else the sweep run (new or continued)."""
    sources = [
        load_source(f"runs:/{run_id}/model", allow_pickle=allow_pickle) for run_id in train_ids
    ]
    methods, sparsities = list(config.methods), list(config.sparsities)
    key = sweep_key(sources, methods, sparsities)
    finished = finished_run(Stage("sweep", "sweep", key=key, parent_run_id=study_id))
    if finished is not None:
        return finished
    settings = CellSettings.like_training(config.train)
    return run_sweep(sources, methods, sparsities, settings, executor=executor)
