"""Bad input, one case per row: one `error:` line naming the file, line or value, exit code 1,
no traceback, and nothing written (no MLflow run, no image cache; only the list of unreadable
images is kept beside where the cache would be)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from prunecxr.cli import main
from prunecxr.models import create_model

LABELS = "miccai2023_nih-cxr-lt_labels_train.csv"
TRAIN = ["--arch", "resnet18", "--image-size", "32", "--pretrained", "none", "--device", "cpu"]


def _edit_labels(edit):
    def apply(data: Path) -> None:
        frame = pd.read_csv(data / LABELS)
        edit(frame).to_csv(data / LABELS, index=False)

    return apply


def _set(row: int, column: str, value):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        return frame

    return _edit_labels(edit)


def _write(name: str, content: bytes):
    return lambda data: (data / name).write_bytes(content)


def _checkpoint(arch: str, classes: int):
    def save(data: Path) -> None:
        torch.save({"weights": create_model(arch, classes).state_dict()}, data / "chkpt.pt")

    return save


def _train_run(data: Path) -> None:
    """A run of another stage, to be passed where a sweep is expected."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("prunecxr") or client.create_experiment("prunecxr")
    experiment_id = getattr(experiment, "experiment_id", experiment)
    run = client.create_run(experiment_id, tags={"prunecxr.stage": "train"})
    (data / "run_id").write_text(run.info.run_id)


# (case, how the data is spoiled, command line with {data}, what the error line says)
CASES = [
    ("data dir missing", None, ["train", "--data-dir", "{data}/nowhere"], "does not exist"),
    (
        "label dir missing",
        None,
        ["train", "--data-dir", "{data}", "--label-dir", "{data}/nowhere"],
        "--label-dir {data}/nowhere does not exist",
    ),
    (
        "class column missing",
        _edit_labels(lambda f: f.drop(columns=["Hernia"])),
        ["train", "--data-dir", "{data}"],
        f"{LABELS}: missing column(s) 'Hernia'",
    ),
    (
        "label not 0/1",
        _set(3, "Hernia", 2),
        ["train", "--data-dir", "{data}"],
        "line 5, column 'Hernia': label 2 is not 0 or 1",
    ),
    (
        "label NaN",
        _set(3, "Hernia", None),
        ["train", "--data-dir", "{data}"],
        "line 5, column 'Hernia': label nan is not 0 or 1",
    ),
    (
        "split with no rows",
        _edit_labels(lambda f: f.iloc[:0]),
        ["train", "--data-dir", "{data}"],
        f"{LABELS}: no rows",
    ),
    (
        "image missing",
        lambda data: (data / "00000001_000.png").unlink(),
        ["train", "--data-dir", "{data}"],
        "1 unreadable image(s) listed in {data}/" + LABELS + ": {data}/00000001_000.png: not found",
    ),
    (
        "image truncated",
        lambda data: (data / "00000001_000.png").write_bytes(
            (data / "00000001_000.png").read_bytes()[:60]
        ),
        ["train", "--data-dir", "{data}"],
        "{data}/00000001_000.png: image file is truncated",
    ),
    (
        "not an image",
        _write("00000001_000.png", b"not a png"),
        ["train", "--data-dir", "{data}"],
        "{data}/00000001_000.png: cannot identify image file",
    ),
    (
        "duplicate id",
        _set(3, "id", "00000002_000.png"),
        ["train", "--data-dir", "{data}"],
        "id '00000002_000.png' is listed more than once (lines 4, 5)",
    ),
    (
        "path leaves the data dir",
        _set(3, "id", "../elsewhere/00000001_000.png"),
        ["train", "--data-dir", "{data}"],
        "line 5: id '../elsewhere/00000001_000.png' leaves the data dir",
    ),
    (
        "absolute path",
        _set(3, "id", "/etc/passwd"),
        ["train", "--data-dir", "{data}"],
        "line 5: id '/etc/passwd' leaves the data dir",
    ),
    (
        "image size 0",
        None,
        ["train", "--data-dir", "{data}", "--image-size", "0"],
        "'--image-size': 0 is not in the range x>=1",
    ),
    (
        "batch size 0",
        None,
        ["train", "--data-dir", "{data}", "--batch-size", "0"],
        "'--batch-size': 0 is not in the range x>=1",
    ),
    (
        "max epochs 0",
        None,
        ["train", "--data-dir", "{data}", "--max-epochs", "-1"],
        "'--max-epochs': -1 is not in the range x>=1",
    ),
    ("sparsity 1", None, ["prune", "--sparsity", "1"], "'--sparsity': 1.0 is not in the range"),
    (
        "sparsity in a grid",
        None,
        ["sweep", "--sparsities", "0,0.5,1.5"],
        "bad sparsities '0,0.5,1.5': every sparsity must be in [0, 1)",
    ),
    ("unknown method", None, ["prune", "--method", "magnitude"], "'magnitude' is not one of"),
    ("unknown methods", None, ["sweep", "--methods", "l1,snip"], "unknown method(s) ['snip']"),
    ("unknown arch", None, ["train", "--data-dir", "{data}", "--arch", "vgg16"], "'vgg16'"),
    ("unknown dataset", None, ["train", "--dataset", "chexpert"], "'chexpert' is not one of"),
    (
        "checkpoint of another architecture",
        _checkpoint("resnet18", 20),
        ["prune", "--model-uri", "{data}/chkpt.pt", "--data-dir", "{data}", "--arch", "resnet50"],
        "{data}/chkpt.pt does not fit resnet50",
    ),
    (
        "checkpoint with another class count",
        _checkpoint("resnet18", 19),
        ["prune", "--model-uri", "{data}/chkpt.pt", "--data-dir", "{data}", "--arch", "resnet18"],
        "{data}/chkpt.pt does not fit resnet18",
    ),
    (
        "model URI that does not resolve",
        None,
        ["prune", "--model-uri", "runs:/0123456789abcdef/model"],
        "cannot find model 'runs:/0123456789abcdef/model'",
    ),
    (
        "sweep run id that is not a sweep",
        _train_run,
        ["analyze", "--sweep-run-id", "{run_id}"],
        "is a train run, not a sweep",
    ),
]


@pytest.mark.parametrize(
    ("spoil", "args", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_clear_error_line_and_nothing_written(
    spoil, args, says, tiny_nih, tmp_path, mlflow_store, capsys
):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    if spoil:
        spoil(data)
    run_id = (data / "run_id").read_text() if (data / "run_id").exists() else ""
    runs_before = _all_runs()
    cache = tmp_path / "cache"
    command = [a.format(data=data, run_id=run_id) for a in args]
    if command[0] in ("train", "prune", "sweep"):
        command += ["--cache-dir", str(cache)]
    if command[0] == "train":  # the tiny settings, unless the case sets the option itself
        for option, value in zip(TRAIN[::2], TRAIN[1::2]):
            if option not in command:
                command += [option, value]
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "Traceback" not in "\n".join(error)
    assert says.format(data=data) in error[-1]
    assert _all_runs() == runs_before  # no run created
    assert not list(cache.glob("*.npy"))  # no cache kept, not even a partial one


def test_every_bad_image_is_listed_at_once_or_skipped_with_a_count(
    tiny_nih, tmp_path, mlflow_store, capsys, caplog
):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    train_ids = pd.read_csv(data / LABELS)["id"].tolist()
    missing, truncated, not_png = (data / name for name in train_ids[:3])
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:60])
    not_png.write_bytes(b"not a png")
    cache = tmp_path / "cache"
    command = ["train", "--data-dir", str(data), "--cache-dir", str(cache), *TRAIN]
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--max-epochs", "1"])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: 3 unreadable image(s) listed in {data / LABELS}: ")
    assert "or pass --skip-bad-images to train without them" in error
    (listing,) = cache.glob("*.bad.jsonl")
    assert f"(all in {listing})" in error
    listed = [json.loads(line)["path"] for line in listing.read_text().splitlines()]
    assert sorted(listed) == sorted(map(str, (missing, truncated, not_png)))
    assert not list(cache.glob("*.npy")) and _all_runs() == 0

    notes = logging.getLogger("prunecxr")  # the CLI's notes do not reach the root logger
    notes.addHandler(caplog.handler)
    try:
        main([*command, "--max-epochs", "1", "--skip-bad-images"])
    finally:
        notes.removeHandler(caplog.handler)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["skip_bad_images"] == "true"
    skipped = {k: v for k, v in run.data.metrics.items() if k.startswith("skipped_images_")}
    assert skipped == {"skipped_images_train": 3, "skipped_images_val": 0, "skipped_images_test": 0}
    assert "skipping 3 unreadable image(s) (--skip-bad-images)" in caplog.text


def _all_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


def test_a_full_disk_while_caching_is_an_error_and_leaves_no_partial_cache(
    tiny_nih, tmp_path, mlflow_store, capsys
):
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)])
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a 64 kB tmpfs as a full disk")
    try:
        command = ["train", "--data-dir", str(tiny_nih), "--cache-dir", str(small), *TRAIN]
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--image-size", "64"])  # 96 x 64 x 64 bytes > 64 kB
        assert exit_.value.code == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error == (
            f"error: cannot write the image cache {small}: No space left on device; free space "
            f"there or pass --cache-dir on a larger disk"
        )
        left = [path.name for path in small.iterdir() if path.suffix != ".lock"]
        assert left == []  # no partial file a later run could trust (the empty lock stays)
        assert _all_runs() == 0
    finally:
        subprocess.run(["umount", str(small)], check=True)
