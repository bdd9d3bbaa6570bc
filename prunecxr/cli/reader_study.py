"""`prunecxr reader-study`: the radiologist reader study of PIEs (paper Fig. 6): export the
images for readers, then analyze their answers."""

from __future__ import annotations

from pathlib import Path

import click

from prunecxr import PrunecxrError, tracking
from prunecxr.stages.reader_study import Export, analyze_study, export_study

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group("reader-study")
def reader_study() -> None:
    """The paper's reader study of PIEs: `export` images for radiologists, `analyze` their
    answers."""


@reader_study.command()
@click.argument("analyze_run_id")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for reader-1, reader-2, ... and key.csv (key.csv stays out of the reader folders).",
)
@click.option(
    "--per-reader",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="PIEs per reader, and as many non-PIEs.",
)
@click.option(
    "--readers",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Reader folders; no image is in two.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draw.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
@click.option("--data-dir", type=_FOLDER, help="Images [default: the analyzed sweep's data].")
@click.option(
    "--label-dir", type=_FOLDER, help="Label files [default: the sweep's, else --data-dir]."
)
def export(analyze_run_id, out, **options) -> None:
    """Copy PIEs and non-PIEs of an analyze run under anonymous names, with labels.csv and a
    VIA 2 project per reader; the key goes to OUT/key.csv and a reader_study run (in the
    analyze run's experiment)."""
    run_id = export_study(Export(analyze_run_id, out, **options))
    click.echo(
        f"reader study in {out} (give readers only the reader-* folders); key: "
        f"{out / 'key.csv'} and run {run_id}"
    )


@reader_study.command()
@click.argument("key_or_run")
@click.argument("more_responses", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--responses",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="VIA 2 CSV exports or plain CSVs (reader, filename, agree, quality, difficulty); "
    "several may follow one --responses.",
)
@click.option(
    "--experiment",
    default="prunecxr",
    show_default=True,
    help="MLflow experiment, where the key's analyze run is not in this store (else its own).",
)
def analyze(key_or_run, more_responses, responses, experiment) -> None:
    """Answers of KEY_OR_RUN's readers (a key.csv, an export run or its analyze run): PIEs vs
    non-PIEs per question, tables, figure and metrics in a reader_study run."""
    files = [Path(f) for f in (*responses, *more_responses)]
    if not files:
        raise PrunecxrError("no responses: pass --responses FILE [FILE ...]")
    tracking.use_experiment(experiment)
    result = analyze_study(key_or_run, files)
    for row in result.statistics[result.statistics.scale == "raw"].itertuples():
        click.echo(
            f"{row.question}: PIEs {row.pie_mean:.2f} ± {row.pie_sd:.2f} (n={row.pie_n}), "
            f"non-PIEs {row.other_mean:.2f} ± {row.other_sd:.2f} (n={row.other_n}); "
            f"Kruskal-Wallis p = {row.kruskal_p:.3g}"
        )
    checked = result.checked
    click.echo(
        f"{len(checked.valid)} responses used, {len(checked.rejected)} rejected; "
        f"reader_study run {result.run_id}"
    )
