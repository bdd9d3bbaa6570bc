"""The reader study of PIEs (paper Fig. 6): the draw, the reader folders and their VIA 2
project, reading and checking answers, the statistics (on hand cases and synthetic readers),
and export -> analyze through the CLI on a real analyze run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from prunecxr import PrunecxrError, tracking
from prunecxr.analysis import reader_responses as responses
from prunecxr.analysis import reader_study as study
from prunecxr.cli import main
from prunecxr.data import get_schema
from prunecxr.data.labels import read_labels
from prunecxr.stages.analyze import PublishedPredictions, analyze_published
from prunecxr.stages.reader_study import Export, export_study

VIA_HEADER = (
    "filename,file_size,file_attributes,region_count,region_id,"
    "region_shape_attributes,region_attributes"
)


def _pools(n_pies: int = 30, n_others: int = 200) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = [f"{i:08d}_000.png" for i in range(n_pies + n_others)]
    rows = pd.DataFrame({"row": range(len(images)), "image": images})
    return rows.iloc[:n_pies], rows.iloc[n_pies:]


def _key(per_reader: int = 20, readers: int = 3, seed: int = 0) -> pd.DataFrame:
    pies, others = _pools(per_reader * readers, 4 * per_reader * readers)
    return study.select_images(pies, others, per_reader, readers, seed).assign(analyze_run_id="x")


def test_the_draw_is_seeded_balanced_and_disjoint():
    pies, others = _pools()
    key = study.select_images(pies, others, per_reader=5, readers=3, seed=7)
    assert key.equals(study.select_images(pies, others, per_reader=5, readers=3, seed=7))
    assert not key.equals(study.select_images(pies, others, per_reader=5, readers=3, seed=8))
    shuffled = study.select_images(pies.iloc[::-1], others.sample(frac=1, random_state=1), 5, 3, 7)
    assert key.equals(shuffled)  # the pools' order does not matter
    assert list(key.columns) == study.KEY_COLUMNS[:-1]
    assert key.groupby("reader").is_pie.agg(["sum", "size"]).values.tolist() == [[5, 10]] * 3
    assert key.image.is_unique and key.filename.is_unique  # no image twice over all readers
    assert set(key.image[key.is_pie]) <= set(pies.image)
    assert set(key.image[~key.is_pie]) <= set(others.image)
    assert key.filename.iloc[0] == "img-0001.png" and key.filename.iloc[-1] == "img-0030.png"
    assert any(
        list(part.is_pie) != sorted(part.is_pie, reverse=True) for _, part in key.groupby("reader")
    )


def test_too_few_pies_is_one_error_with_the_counts():
    pies, others = _pools(n_pies=3)
    with pytest.raises(PrunecxrError, match=r"has 3 PIEs; 2 reader\(s\) x 2 PIEs need 4"):
        study.select_images(pies, others, per_reader=2, readers=2, seed=0)


def test_non_pies_leave_out_pies_and_undefined_correlations():
    images = [f"{i}.png" for i in range(6)]
    pies = pd.DataFrame({"row": [1], "image": ["1.png"]})
    undefined = pd.DataFrame({"row": [4], "image": ["4.png"]})
    pool = study.non_pie_pool(images, pies, undefined)
    assert pool.values.tolist() == [[0, "0.png"], [2, "2.png"], [3, "3.png"], [5, "5.png"]]


def test_reader_folder_has_images_labels_and_a_via_project_but_no_key(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    key = _key(per_reader=2, readers=2)
    for image in key.image:
        Image.fromarray(np.full((8, 8), hash(image) % 255, np.uint8)).save(data / image)
    findings = {image: "Effusion, Mass" for image in key.image}
    out = tmp_path / "study"
    study.check_out(out, overwrite=False)
    study.clear_out(out)
    for reader, part in key.groupby("reader"):
        study.write_reader_folder(part, findings, data, out / f"reader-{reader}")
    folder = out / "reader-1"
    part = key[key.reader == 1]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*part.filename, "labels.csv", "via_project.json"]
    )
    for path in folder.iterdir():  # nothing says which original image or whether it is a PIE
        text = path.read_bytes()
        assert not any(image.encode() in text for image in key.image), path
        assert b"is_pie" not in text and b"PIE" not in text
    labels = pd.read_csv(folder / "labels.csv")
    assert labels.values.tolist() == [[f, "Effusion, Mass"] for f in part.filename]
    project = json.loads((folder / "via_project.json").read_text())
    ids = [f + str((folder / f).stat().st_size) for f in part.filename]
    assert project["_via_image_id_list"] == ids == list(project["_via_img_metadata"])
    assert project["_via_img_metadata"][ids[0]]["file_attributes"] == {"label": "Effusion, Mass"}
    assert project["_via_data_format_version"].startswith("2.")
    assert {"ui", "core", "project"} <= set(project["_via_settings"])
    attributes = project["_via_attributes"]["file"]
    assert {n: a["type"] for n, a in attributes.items()} == {
        "label": "text",
        "agree": "radio",
        "quality": "radio",
        "difficulty": "radio",
    }
    assert list(attributes["agree"]["options"]) == ["yes", "no"]
    assert (
        list(attributes["quality"]["options"])
        == list(attributes["difficulty"]["options"])
        == [
            "1",
            "2",
            "3",
            "4",
            "5",
        ]
    )
    assert all(not attributes[q]["default_options"] for q in ("agree", "quality", "difficulty"))


def test_a_full_out_folder_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "reader-1").mkdir()
    (tmp_path / "key.csv").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PrunecxrError, match="not empty; choose another folder or pass --overwrite"):
        study.check_out(tmp_path, overwrite=False)
    study.check_out(tmp_path, overwrite=True)
    with pytest.raises(PrunecxrError, match="is a file, not a folder"):
        study.check_out(tmp_path / "key.csv", overwrite=True)
    study.clear_out(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _via_csv(path, rows: list[tuple[str, dict | str]]):
    """A CSV as VIA 2's "Export annotations (as csv)" writes it (one region-less row per file)."""
    lines = [VIA_HEADER]
    for filename, attributes in rows:
        text = attributes if isinstance(attributes, str) else json.dumps(attributes)
        lines.append(f'{filename},1234,"{text.replace(chr(34), 2 * chr(34))}",0,0,"{{}}","{{}}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_a_via_export_with_our_names_or_the_originals_questions(tmp_path):
    key = _key(per_reader=2, readers=1)
    a, b, c = key.filename[:3]
    path = _via_csv(
        tmp_path / "reader-1.csv",
        [
            (a, {"label": "Mass", "agree": "yes", "quality": "4", "difficulty": "2"}),
            (
                b,
                {
                    "Do you fully agree with the label?": "no",
                    "How would you rate the image quality?": "1",
                    "How difficult would you consider it to properly diagnose this image?": "5",
                },
            ),
        ],
    )
    with path.open("a") as file:  # a file with two regions: two rows, one response
        answers = '"{""agree"":""yes"",""quality"":""3"",""difficulty"":""3""}"'
        for region in (0, 1):
            file.write(f'{c},99,{answers},2,{region},"{{}}","{{}}"\n')
    checked = responses.check_responses(responses.read_responses(path), key)
    assert checked.rejected.empty
    valid = checked.valid.set_index("filename")
    assert valid.loc[a, ["agree", "quality", "difficulty"]].tolist() == [1.0, 4.0, 2.0]
    assert valid.loc[b, ["agree", "quality", "difficulty"]].tolist() == [0.0, 1.0, 5.0]
    assert valid.loc[c, "line"] == 4 and len(valid) == 3
    assert set(valid.reader) == {"1"}  # the reader whose folder holds the file
    truth = key.set_index("filename")
    assert (valid.is_pie == truth.is_pie[valid.index]).all()


def test_every_bad_response_is_reported_with_its_line_and_value(tmp_path):
    key = _key(per_reader=4, readers=1)
    f = list(key.filename)
    good = {"agree": "no", "quality": "2", "difficulty": "4"}
    via = _via_csv(
        tmp_path / "via.csv",
        [
            (f[0], good),
            ("img-9999.png", good),  # line 3: unknown file
            (f[0], good),  # line 4: duplicate of line 2
            (f[1], {**good, "agree": "maybe"}),  # line 5
            (f[2], {**good, "quality": "7"}),  # line 6
            (f[3], {"agree": "yes", "quality": "3"}),  # line 7: difficulty missing
            (f[4], "{not json"),  # line 8
        ],
    )
    plain = tmp_path / "plain.csv"
    plain.write_text(
        f"reader,filename,agree,quality,difficulty\nann,{f[5]},Yes,5.0,1\nann,{f[6]},,,\n"
    )
    raw = pd.concat([responses.read_responses(via), responses.read_responses(plain)])
    checked = responses.check_responses(raw, key)
    messages = list(checked.rejected.message)
    assert messages == [
        f"{via}: line 3: img-9999.png: file 'img-9999.png' is not in the key (not a file of this study)",
        f"{via}: line 4: {f[0]}: duplicate of {via} line 2 (reader 1, {f[0]})",
        f"{via}: line 5: {f[1]}: agree 'maybe' is not yes/no",
        f"{via}: line 6: {f[2]}: quality '7' is not 1/2/3/4/5",
        f"{via}: line 7: {f[3]}: difficulty missing",
        f"{via}: line 8: {f[4]}: file_attributes '{{not json' is not JSON",
        f"{plain}: line 3: {f[6]}: agree missing; quality missing; difficulty missing",
    ]
    assert list(checked.rejected.columns) == responses.REJECTED_COLUMNS
    assert sorted(checked.valid.filename) == sorted([f[0], f[5]])
    row = checked.valid.set_index("filename").loc[f[5]]
    assert (row.reader, row.agree, row.quality, row.difficulty) == ("ann", 1.0, 5.0, 1.0)


def test_a_file_that_is_neither_format_is_one_error(tmp_path):
    path = tmp_path / "answers.csv"
    path.write_text("name,score\na,1\n")
    with pytest.raises(PrunecxrError, match=r"neither a VIA export .* \(missing reader, filename"):
        responses.read_responses(path)


def test_statistics_match_scipy_on_a_hand_case():
    pie, other = np.array([1.0, 2, 2, 3]), np.array([3.0, 4, 4, 5, 5])
    row = responses.compare(pie, other)
    assert (row["pie_n"], row["pie_mean"], row["other_mean"]) == (4, 2.0, 4.2)
    assert row["pie_sd"] == pytest.approx(np.sqrt(2 / 3))
    assert row["kruskal_p"] == pytest.approx(stats.kruskal(pie, other).pvalue)
    assert row["mannwhitney_statistic"] == pytest.approx(stats.mannwhitneyu(pie, other).statistic)
    assert row["mannwhitney_p"] == pytest.approx(stats.mannwhitneyu(pie, other).pvalue)
    assert row["welch_p"] == pytest.approx(stats.ttest_ind(pie, other, equal_var=False).pvalue)
    same = responses.compare(np.ones(3), np.ones(3))  # nothing to test: NaN, no warning
    assert np.isnan(same["kruskal_p"]) and np.isnan(same["welch_p"])
    assert np.isnan(responses.compare(np.ones(1), np.ones(3))["kruskal_p"])


def _synthetic_answers(key: pd.DataFrame, seed: int, effect: bool) -> pd.DataFrame:
    """Plain-CSV answers of synthetic readers, each with a bias of their own; with `effect`
    PIEs are agreed with less, rated lower in quality and harder."""
    rng = np.random.default_rng(seed)
    shift = np.where(key.is_pie, 1.0, 0.0) if effect else np.zeros(len(key))
    bias = rng.normal(0, 0.7, key.reader.max() + 1)[key.reader]
    quality = np.clip(np.rint(3.6 - 1.2 * shift + bias + rng.normal(0, 0.9, len(key))), 1, 5)
    difficulty = np.clip(np.rint(2.4 + 1.2 * shift + bias + rng.normal(0, 0.9, len(key))), 1, 5)
    agree = rng.random(len(key)) < 0.85 - 0.35 * shift
    return pd.DataFrame(
        {
            "reader": key.reader.astype(str),
            "filename": key.filename,
            "agree": np.where(agree, "yes", "no"),
            "quality": quality.astype(int),
            "difficulty": difficulty.astype(int),
        }
    )


def _p_values(key: pd.DataFrame, answers: pd.DataFrame, tmp_path) -> pd.DataFrame:
    path = tmp_path / "answers.csv"
    answers.to_csv(path, index=False)
    checked = responses.check_responses(responses.read_responses(path), key)
    assert checked.rejected.empty
    return responses.statistics(checked.valid).set_index(["question", "scale"])


def test_a_planted_pie_effect_is_found(tmp_path):
    key = _key(per_reader=20, readers=3)
    table = _p_values(key, _synthetic_answers(key, seed=0, effect=True), tmp_path)
    for scale in ("raw", "z"):
        assert (
            table.xs(scale, level="scale")[["kruskal_p", "mannwhitney_p", "welch_p"]] < 0.05
        ).all(axis=None)
    raw = table.xs("raw", level="scale")
    assert (raw.pie_mean < raw.other_mean)[["agree", "quality"]].all()
    assert raw.pie_mean["difficulty"] > raw.other_mean["difficulty"]


def test_without_an_effect_it_is_mostly_not_found(tmp_path):
    key = _key(per_reader=20, readers=3)
    found = np.array(
        [
            _p_values(key, _synthetic_answers(key, seed, effect=False), tmp_path)
            .xs("raw", level="scale")
            .kruskal_p.to_numpy()
            < 0.05
            for seed in range(20)
        ]
    )
    assert found.sum(axis=0).max() <= 4, found.sum(axis=0)  # ~1 in 20 per question by chance


def test_scores_are_standardized_within_each_reader(tmp_path):
    key = _key(per_reader=10, readers=2)
    answers = _synthetic_answers(key, seed=3, effect=False)
    answers.loc[answers.reader == "2", "quality"] = 5  # reader 2: always the same score
    path = tmp_path / "answers.csv"
    answers.to_csv(path, index=False)
    valid = responses.check_responses(responses.read_responses(path), key).valid
    z = valid[valid.reader == "1"].z_difficulty
    assert z.mean() == pytest.approx(0, abs=1e-12) and z.std() == pytest.approx(1)
    assert valid[valid.reader == "2"].z_quality.isna().all()  # no spread: no z-score


def test_export_finds_a_sweeps_data_through_its_prune_runs(tiny_nih, tmp_path, mlflow_store):
    """An analyze run of a sweep logs no data paths: its sweep's prune runs have them. Runs
    logged by hand with the names the stages use (a real sweep takes a minute to make)."""
    nih = get_schema("nih-cxr-lt")
    test = read_labels(nih, tiny_nih, "test")
    tracking.use_experiment("prunecxr")
    with tracking.start_run("sweep", run_name="sweep") as sweep_id:
        with tracking.start_run("prune", run_name="cell", parent_run_id=sweep_id):
            paths = {"data_dir": str(tiny_nih), "label_dir": str(tiny_nih)}
            tracking.log_params({"dataset": nih.name, **paths})
    with tracking.start_run("analyze", run_name="analyze") as analyze_id:
        tracking.log_params({"sweep_run_id": sweep_id, "dataset": nih.name})
        pies = pd.DataFrame({"row": [5, 6, 7], "image": test.image_ids[5:8], "corr": [0.1] * 3})
        tracking.log_table(pies, "tables/pies.csv")
        undefined = pd.DataFrame({"row": [0], "image": test.image_ids[:1]})
        tracking.log_table(undefined, "tables/pies_undefined.csv")
    out = tmp_path / "out"
    export_study(Export(analyze_id, out, per_reader=3, readers=1, seed=1))
    key = pd.read_csv(out / "key.csv")
    assert sorted(key.image[key.is_pie]) == sorted(test.image_ids[5:8])
    assert set(key.image[~key.is_pie]).isdisjoint(test.image_ids[:1] + test.image_ids[5:8])
    assert (key.image == [test.image_ids[row] for row in key.row]).all()
    labels = pd.read_csv(out / "reader-1" / "labels.csv").set_index("filename").label
    for filename, row in zip(key.filename, key.row):
        assert labels[filename] == study.findings_text(test.labels[row], nih.classes)


def _published_analyze_run(data_dir, preds) -> str:
    """A real analyze run of prediction files as the original's prune.py wrote them."""
    nih = get_schema("nih-cxr-lt")
    test = read_labels(nih, data_dir, "test")
    rng = np.random.default_rng(0)
    preds.mkdir()
    for seed in (0, 1):
        for k in ("0", "0.9"):
            noise = rng.random(test.labels.shape) * (0.3 + float(k))
            frame = pd.DataFrame(np.clip(0.6 * test.labels + noise, 0, 1), columns=nih.classes)
            frame["label"] = ["|".join(np.array(nih.classes)[row == 1]) for row in test.labels]
            frame.to_pickle(preds / f"nih-cxr-lt_resnet50_seed-{seed}_prune-{k}.pkl")
    tracking.use_experiment("prunecxr")
    return analyze_published(PublishedPredictions("nih-cxr-lt", preds, data_dir), allow_pickle=True)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`prunecxr ARGS` in this process (as main() runs it): exit code, stdout, stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _artifact(run_id: str, path: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{path}"))


@pytest.mark.slow
def test_export_then_analyze_through_the_cli(tiny_nih, tmp_path, mlflow_store, capsys, caplog):
    """An analyze run's PIEs exported for two readers, their VIA answers analyzed; the key
    stays out of the reader folders; a full --out and too few PIEs are one-line errors."""
    analyze_id = _published_analyze_run(tiny_nih, tmp_path / "preds")
    out = tmp_path / "study"
    export = ("reader-study", "export", analyze_id, "--out", str(out), "--data-dir", str(tiny_nih))
    key = _export_for_two_readers(capsys, export, analyze_id)
    _refused_exports_leave_the_last_one(capsys, export, analyze_id, key)
    _analyze_answers(capsys, caplog, analyze_id, key, tmp_path)


def _export_for_two_readers(capsys, export: tuple[str, ...], analyze_id: str) -> pd.DataFrame:
    out = Path(export[4])
    code, stdout, stderr = _cli(capsys, *export, "--per-reader", "1", "--readers", "2")
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["key.csv", "reader-1", "reader-2"]
    key = pd.read_csv(out / "key.csv")
    assert key.groupby("reader").is_pie.agg(["sum", "size"]).values.tolist() == [[1, 2]] * 2
    assert set(key.image[key.is_pie]) <= set(_artifact(analyze_id, "tables/pies.csv").image)
    for folder in ("reader-1", "reader-2"):
        assert len(list((out / folder).glob("img-*.png"))) == 2
        for path in (out / folder).iterdir():
            assert not any(image.encode() in path.read_bytes() for image in key.image), path
    export_run = mlflow.get_run(stdout.split(" and run ")[1].split()[0])
    assert export_run.data.tags["prunecxr.stage"] == "reader_study"
    assert export_run.data.tags["mlflow.parentRunId"] == analyze_id
    assert _artifact(export_run.info.run_id, "key.csv").equals(key)
    return key


def _refused_exports_leave_the_last_one(capsys, export, analyze_id: str, key) -> None:
    out = Path(export[4])
    code, _, stderr = _cli(capsys, *export)
    assert code == 1 and stderr.strip().splitlines() == [
        f"error: --out {out} is not empty; choose another folder or pass --overwrite"
    ]
    n_pies = len(_artifact(analyze_id, "tables/pies.csv"))
    code, _, stderr = _cli(capsys, *export, "--overwrite", "--per-reader", str(n_pies + 1))
    assert code == 1 and stderr.strip().splitlines()[-1] == (
        f"error: the analyze run has {n_pies} PIEs; 6 reader(s) x {n_pies + 1} PIEs need "
        f"{6 * (n_pies + 1)}: lower --per-reader or --readers"
    )
    assert pd.read_csv(out / "key.csv").equals(key)


def _analyze_answers(capsys, caplog, analyze_id: str, key: pd.DataFrame, tmp_path) -> None:
    """Readers who agree less with PIEs and rate them lower, one answer for an unknown file."""
    answers = [
        (f, {"agree": "no" if pie else "yes", "quality": "2" if pie else "4", "difficulty": "3"})
        for f, pie in zip(key.filename, key.is_pie)
    ]
    unknown = ("img-0099.png", answers[0][1])
    files = [
        _via_csv(tmp_path / "r1.csv", answers[:2]),
        _via_csv(tmp_path / "r2.csv", [*answers[2:], unknown]),
    ]
    notes = logging.getLogger("prunecxr")  # the CLI's notes, as in test_bad_input
    notes.addHandler(caplog.handler)
    try:
        analyze = ("reader-study", "analyze", analyze_id, "--responses", *map(str, files))
        code, stdout, stderr = _cli(capsys, *analyze)
    finally:
        notes.removeHandler(caplog.handler)
    assert code == 0, stderr[-3000:]
    assert f"{files[1]}: line 4: img-0099.png: file 'img-0099.png' is not in the key" in caplog.text
    assert "4 responses used, 1 rejected" in stdout
    assert "agree: PIEs 0.00 ± 0.00 (n=2), non-PIEs 1.00 ± 0.00 (n=2)" in stdout
    _check_analysis_run(stdout.split("reader_study run ")[1].split()[0], analyze_id)
    key_file = str(tmp_path / "study" / "key.csv")
    bad = _via_csv(tmp_path / "bad.csv", [unknown])
    code, _, stderr = _cli(capsys, "reader-study", "analyze", key_file, "--responses", str(bad))
    assert code == 1 and stderr.strip().splitlines()[-1] == (
        "error: no valid response: all 1 in 1 file(s) were rejected"
    )


def _check_analysis_run(run_id: str, analyze_id: str) -> None:
    run = mlflow.get_run(run_id)
    assert run.data.tags["prunecxr.stage"] == "reader_study"
    assert run.data.tags["mlflow.parentRunId"] == analyze_id
    assert run.data.params["part"] == "analysis"
    assert run.data.metrics["n_rejected"] == 1 and run.data.metrics["quality_pie_mean"] == 2
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(run_id, "tables")} == {
        "tables/statistics.csv",
        "tables/responses.csv",
        "tables/rejected_responses.csv",
    }
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == [
        "figures/reader_study.png"
    ]
    statistics = _artifact(run_id, "tables/statistics.csv").set_index(["question", "scale"])
    assert statistics.loc[("quality", "raw"), ["pie_mean", "other_mean"]].tolist() == [2, 4]
    assert len(_artifact(run_id, "tables/rejected_responses.csv")) == 1
