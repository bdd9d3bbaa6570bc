"""Model sources for prune, sweep and analyze: a train run's model (runs:/, models:/) with the
settings of the run that logged it, or a checkpoint file of the original study with settings
given on the command line. The original study kept seed s of a model in `<dir>_seed-<s>/chkpt.pt`
and seed 0 in `<dir>/chkpt.pt`; its 30 seeds are told apart by that layout or by --seed(s)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import nn

from prunecxr import PrunecxrError, tracking
from prunecxr.cells import ModelSource
from prunecxr.data import get_schema
from prunecxr.data.cache import DEFAULT_CACHE_DIR
from prunecxr.models import ARCHS, create_model, load_state_file, model_from_weights
from prunecxr.specs import DataSpec

CHECKPOINT_PRETRAINED = "checkpoint"  # the `pretrained` param of a checkpoint file's cells
_SEED_DIR = re.compile(r"_seed-(\d+)$")


def default_model_uri() -> str:
    hint = "train one first (prunecxr train ...) or pass --model-uri"
    return f"runs:/{tracking.newest_finished_run_id('train', how_to_make_one=hint)}/model"


def load_source(
    uri: str,
    *,
    fallback: DataSpec | None = None,
    arch: str = "resnet50",
    cache_dir: str | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
) -> ModelSource:
    """runs:/<id>/model, models:/<name>/<version> (settings from the train run that logged it)
    or a checkpoint file in the original format (settings from `fallback` and `arch`; its seed
    is `seed`, else read from the original layout). A run's model is read from its weights
    file; a run logged without one is unpickled only with `allow_pickle`."""
    if uri.startswith(("runs:/", "models:/")):
        return _run_source(uri, cache_dir, allow_pickle)
    if fallback is None:
        raise PrunecxrError(
            f"{uri} is a checkpoint file: give --dataset, --data-dir and --image-size for it"
        )
    return _checkpoint_source(Path(uri).resolve(), fallback, arch, seed)


def _run_source(uri: str, cache_dir: str | None, allow_pickle: bool) -> ModelSource:
    run_id = tracking.model_run_id(uri)
    params = tracking.run_settings(tracking.get_run(run_id))
    data = _data_settings(params, cache_dir)
    model = _run_model(uri, run_id, params, allow_pickle)
    seed = int(params["seed"])
    return ModelSource(uri, run_id, params["arch"], seed, params["pretrained"], data, model)


def rebuild_model(settings: dict[str, str], state: dict) -> nn.Module:
    """The model a run logged: its `arch` with as many outputs as the weights' classifier (so
    that neither a dataset's card nor its label files are needed), given the weights `state`."""
    arch = settings["arch"]
    head = state.get(f"{ARCHS[arch].head}.weight") if arch in ARCHS else None
    if head is not None:
        num_classes = head.shape[0]
    else:
        label_dir = settings.get("label_dir") or settings.get("data_dir") or None
        num_classes = get_schema(settings["dataset"], label_dir).num_classes
    image_size = int(settings.get("image_size", 224))
    return model_from_weights(settings["arch"], num_classes, state, image_size)


def _run_model(uri: str, run_id: str, params: dict[str, str], allow_pickle: bool) -> nn.Module:
    state = tracking.load_weights(run_id)
    if state is not None:
        try:
            return rebuild_model(params, state)
        except RuntimeError as error:
            raise PrunecxrError(
                f"{uri}: its weights do not fit {params['arch']}: {error}"
            ) from None
    if not allow_pickle:
        raise PrunecxrError(
            f"{uri} has no weights file ({tracking.WEIGHTS_ARTIFACT}; logged by an older "
            f"prunecxr), only a pickled model, and unpickling can run code: pass --allow-pickle "
            f"if you trust this tracking store"
        )
    return tracking.load_pickled_model(uri)


def _checkpoint_source(path: Path, data: DataSpec, arch: str, seed: int | None) -> ModelSource:
    model = create_model(arch, data.schema().num_classes, image_size=data.image_size)
    try:
        model.load_state_dict(load_state_file(path))
    except RuntimeError as error:
        raise PrunecxrError(f"{path} does not fit {arch}: {error}") from None
    seed = seed_from_layout(path) if seed is None else seed
    return ModelSource(
        str(path), None, arch, seed, CHECKPOINT_PRETRAINED, data, model, file_sha256(path)
    )


def _data_settings(params: dict[str, str], cache_dir: str | None) -> DataSpec:
    return DataSpec(
        dataset=params["dataset"],
        data_dir=params["data_dir"],
        label_dir=params["label_dir"],
        image_size=int(params["image_size"]),
        cache_dir=cache_dir or params.get("cache_dir", str(DEFAULT_CACHE_DIR)),
        preprocess=params.get("preprocess", "default"),  # runs from before the option: default
        skip_bad_images=str(params.get("skip_bad_images")).lower() == "true",
    )


def seed_from_layout(path: Path) -> int:
    """The original study's layout: `<dir>_seed-<s>/chkpt.pt` is seed s, anything else 0."""
    match = _SEED_DIR.search(path.parent.name)
    return int(match.group(1)) if match else 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_of_cell(
    params: dict[str, str], cache_dir: str | None = None, allow_pickle: bool = False
) -> ModelSource:
    """The model a prune run pruned, from the run's params (train run or checkpoint file).
    A checkpoint file must still hold the bytes it held then."""
    if params.get("source_run_id"):
        uri = f"runs:/{params['source_run_id']}/model"
        return load_source(uri, cache_dir=cache_dir, allow_pickle=allow_pickle)
    data = _data_settings(params, cache_dir)
    source = load_source(
        params["checkpoint_path"], fallback=data, arch=params["arch"], seed=int(params["seed"])
    )
    if source.sha256 != params["checkpoint_sha256"]:
        raise PrunecxrError(
            f"{source.uri} changed since it was pruned (sha256 {params['checkpoint_sha256'][:12]}…, "
            f"now {source.sha256[:12]}…); put the original file back"
        )
    return source


def check_distinct_seeds(sources: list[ModelSource]) -> None:
    """The analysis tells a sweep's models apart by seed: two models of one seed would
    overwrite each other's predictions."""
    seen: dict[int, str] = {}
    for source in sources:
        if source.seed in seen:
            raise PrunecxrError(
                f"{seen[source.seed]} and {source.uri} both have seed {source.seed}; a sweep "
                f"needs one model per seed: give checkpoint files their seeds with --seeds "
                f"(or the original layout <dir>_seed-<s>/chkpt.pt)"
            )
        seen[source.seed] = source.uri
