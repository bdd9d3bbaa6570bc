"""The whole pipeline as one `study` run with nested stage runs (design §1).

With no data given, the demo: synthetic NIH-CXR-LT (drawn at 48 px, trained at 32 px) and a
ResNet18, sized to finish within 10 minutes on a 2-core CPU and to show the paper's findings
(README, "The demo's findings")."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from prunecxr import PrunecxrError, ownership, tracking
from prunecxr.analysis.stage import analyze_sweep
from prunecxr.data import SPLITS, get_schema
from prunecxr.data.synthetic import read_marker, write_synthetic
from prunecxr.executor import Executor, WorkerContext, check_readable
from prunecxr.sources import load_source
from prunecxr.sweep import SWEEP_KEY_TAG, CellSettings, run_sweep, sweep_key
from prunecxr.train import RUNTIME_FIELDS, TrainConfig, continue_or_train, keyed_settings

# The demo's data and model: within 10 minutes on 2 CPU cores, and large enough for the paper's
# findings to appear (README, "The demo's findings": what was measured with each choice).
DEMO_SPLIT_SIZES = {"train": 4000, "val": 300, "test": 2000}
# Rare classes: at least 60 training examples (with 30 or 45 more of them stayed near chance:
# nothing to forget) and 15 test positives of 2,000. The tail goes on in the test split, as in
# the real one: with 40 of 1,500, 11 classes shared one test prevalence, and a class pruned to
# chance keeps about prevalence / AP0 of its AP, so its AP change at 0.95 could not follow
# frequency.
DEMO_MIN_POSITIVES = {"train": 60, "val": 3, "test": 15}
# Drawn larger than trained on, as real radiographs are: resizing averages the pixel noise (signs
# drawn at 32 px directly stayed near chance for the rarest classes).
DEMO_DRAW_SIZE = 48
DEMO_TRAIN = dict(
    arch="resnet18",  # ResNet50's depth buys nothing on small synthetic signs
    pretrained="none",  # no ImageNet download offline; synthetic signs are learned from scratch
    image_size=32,  # 20 epochs at 32 px cost what 10 cost at 48 px
    batch_size=64,
    lr=1e-3,  # from scratch, 1e-4 needs many more epochs
    # Without it the weights the data never uses keep their initial size (at 32 px layer4 sees
    # 1x1 maps: 8 of 9 taps of most of its kernels see only padding, ~7 M of 11 M weights), and
    # global L1 removes used ones beside them: at 0.95 all but the commonest classes fell to
    # chance. With 1e-4 only 2 of 20 classes lost 20 % by 0.95; with 1e-5, 11 of 20.
    weight_decay=3e-6,
    # 20, not 10 (at 48 px): after 10 epochs all but the 4 commonest classes had collapsed to
    # chance at 0.95, so their AP change there did not follow frequency
    max_epochs=20,
    patience=20,  # the best weights (lowest validation loss) are kept either way
)
DEMO_SEEDS = 2
# Dense where k20s fall; 0.97, past the paper's grid, so the commonest classes' k20 is not empty.
DEMO_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97)
PAPER_METHODS = ("l1", "random")
PAPER_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95
PAPER_SEEDS = 30
STUDY_KEY_TAG = "prunecxr.study_key"


@dataclass(frozen=True)
class StudyConfig:
    train: TrainConfig
    seeds: tuple[int, ...] = tuple(range(PAPER_SEEDS))
    methods: tuple[str, ...] = PAPER_METHODS
    sparsities: tuple[float, ...] = PAPER_SPARSITIES


def demo_config(demo_dir: Path, dataset: str = "nih-cxr-lt", **overrides) -> StudyConfig:
    """The demo study's settings; `overrides` replace TrainConfig fields (e.g. device)."""
    train = TrainConfig(
        dataset=dataset, data_dir=str(demo_dir), label_dir=str(demo_dir), **DEMO_TRAIN
    )
    return StudyConfig(
        dataclasses.replace(train, **overrides),
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
    the findings the README reports: say so instead of reusing it."""
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
    train = keyed_settings(config.train, exclude=RUNTIME_FIELDS)
    text = repr((sorted(train.items()), config.seeds, config.methods, config.sparsities))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_study(
    config: StudyConfig, executor: Executor = Executor(), *, allow_pickle: bool = False
) -> str:
    """study -> train (one nested run per seed) -> sweep -> analyze, all nested. An unfinished
    study of the same settings is continued: finished train runs are reused, unfinished ones
    resumed from their checkpoints, the sweep skips finished cells, analysis runs once.
    `allow_pickle`: models reused from an older prunecxr (no weights file) may be unpickled."""
    key = study_key(config)
    resume_id = tracking.find_unfinished_run_id("study", STUDY_KEY_TAG, key)
    if resume_id:
        ownership.take_over(resume_id, "study")
    name = f"study-{config.train.dataset}"
    with tracking.start_run("study", run_name=name, run_id=resume_id) as study_id:
        with ownership.owned(study_id, contested=resume_id is not None):
            if resume_id is None:
                tracking.set_tags({STUDY_KEY_TAG: key})
                tracking.log_params(_study_params(config))
            context = WorkerContext.here()
            train_ids = executor.run_all(
                _train_seed,
                [(context, study_id, config.train, seed) for seed in config.seeds],
                [f"seed {seed}" for seed in config.seeds],
            )
            sweep_id = _sweep(study_id, config, train_ids, executor, allow_pickle)
            if not tracking.finished_children(study_id, "analyze"):
                analyze_sweep(sweep_id, allow_pickle=allow_pickle)
    return study_id


def _study_params(config: StudyConfig) -> dict:
    return {
        "dataset": config.train.dataset,
        "arch": config.train.arch,
        "image_size": config.train.image_size,
        "seeds": ",".join(map(str, config.seeds)),
        "methods": ",".join(config.methods),
    }


def _train_seed(context: WorkerContext, study_id: str, train: TrainConfig, seed: int) -> str:
    """A job: the study's train run of `seed`, reused when finished, resumed from its last
    checkpoint when not, trained when there is none."""
    context.enter()
    check_readable(train.data_dir, train.label_dir)
    runs = tracking.children(study_id, "train")
    mine = [(run_id, status) for run_id, status, params in runs if params.get("seed") == str(seed)]
    return continue_or_train(mine, dataclasses.replace(train, seed=seed), study_id)


def _sweep(
    study_id: str, config: StudyConfig, train_ids: list[str], executor: Executor, allow_pickle
) -> str:
    """The study's finished sweep if it has one, else the sweep run (new or continued)."""
    sources = [
        load_source(f"runs:/{run_id}/model", allow_pickle=allow_pickle) for run_id in train_ids
    ]
    methods, sparsities = list(config.methods), list(config.sparsities)
    key = sweep_key(sources, methods, sparsities)
    finished = tracking.finished_child_ids_by_tag(study_id, "sweep", SWEEP_KEY_TAG)
    if key in finished:
        return finished[key]
    settings = CellSettings.like_training(config.train)
    return run_sweep(sources, methods, sparsities, settings, executor=executor)
