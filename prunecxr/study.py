"""The whole pipeline as one `study` run with nested stage runs (design §1).

With no data given, the demo: synthetic NIH-CXR-LT at 64 px and a ResNet18, sized to finish in
minutes on a 2-core CPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from prunecxr import PrunecxrError, tracking
from prunecxr.analysis.stage import analyze_sweep
from prunecxr.data import SPLITS, get_schema
from prunecxr.data.synthetic import read_marker, write_synthetic
from prunecxr.sweep import CellSettings, load_source, run_sweep
from prunecxr.train import TrainConfig, run_training

# The demo's data and model: small enough for minutes on 2 CPU cores, large enough that head
# classes are learned and tail classes are not (each comment says why the value was chosen).
DEMO_SPLIT_SIZES = {"train": 2000, "val": 300, "test": 600}
DEMO_TRAIN = dict(
    arch="resnet18",  # ResNet50's depth buys nothing on 64 px synthetic signs
    pretrained="none",  # no ImageNet download offline; synthetic signs are learned from scratch
    image_size=64,
    batch_size=64,
    lr=1e-3,  # from scratch, 1e-4 needs many more epochs
    max_epochs=6,
    patience=3,
)
DEMO_SEEDS = 2
DEMO_SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)  # where the curves bend, few cells
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
    train = TrainConfig(
        dataset=dataset, data_dir=str(demo_dir), label_dir=str(demo_dir), **DEMO_TRAIN
    )
    return StudyConfig(
        dataclasses.replace(train, **overrides),
        seeds=tuple(range(DEMO_SEEDS)),
        methods=("l1", "random", "structured"),
        sparsities=DEMO_SPARSITIES,
    )


def ensure_demo_data(demo_dir: Path, dataset: str = "nih-cxr-lt") -> None:
    """Generate the demo's synthetic data once; reuse it on later runs."""
    schema = get_schema(dataset)
    if read_marker(demo_dir) and all((demo_dir / schema.label_file(s)).exists() for s in SPLITS):
        return
    if demo_dir.exists() and any(demo_dir.iterdir()):
        raise PrunecxrError(
            f"{demo_dir} exists and is not a complete {dataset} synthetic dataset; "
            f"remove it or pass another --demo-dir"
        )
    write_synthetic(schema, demo_dir, DEMO_SPLIT_SIZES, image_size=DEMO_TRAIN["image_size"])


def run_study(config: StudyConfig) -> str:
    """study -> train (one nested run per seed) -> sweep -> analyze, all nested."""
    with tracking.start_run("study", run_name=f"study-{config.train.dataset}") as study_id:
        tracking.log_params(
            {
                "dataset": config.train.dataset,
                "arch": config.train.arch,
                "image_size": config.train.image_size,
                "seeds": ",".join(map(str, config.seeds)),
                "methods": ",".join(config.methods),
            }
        )
        train_ids = [run_training(dataclasses.replace(config.train, seed=s)) for s in config.seeds]
        sources = [load_source(f"runs:/{run_id}/model") for run_id in train_ids]
        settings = CellSettings(
            device=config.train.device,
            channels_last=config.train.channels_last,
            precision=config.train.precision,
            batch_size=config.train.batch_size,
            num_workers=config.train.num_workers,
        )
        sweep_id = run_sweep(sources, list(config.methods), list(config.sparsities), settings)
        analyze_sweep(sweep_id)
    return study_id
