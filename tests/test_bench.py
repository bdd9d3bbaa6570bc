"""The sweep benchmark runs end to end and both ways agree (tiny sizes; numbers in docs/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunecxr.data import get_schema
from prunecxr.data.synthetic import write_synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCH = PROJECT_ROOT / "bench" / "sweep_throughput.py"


@pytest.mark.slow
def test_sweep_benchmark_agrees_and_reports_both_throughputs(tmp_path):
    """Pointed at a user's folder, the benchmark only reads it: its checkpoint and cache go to
    a scratch folder of its own (it once overwrote chkpt.pt and deleted cache/*.npy there)."""
    data = tmp_path / "data"
    write_synthetic(
        get_schema("nih-cxr-lt"), data, {"train": 8, "val": 8, "test": 24}, image_size=64
    )
    (data / "chkpt.pt").write_bytes(b"the user's own model")
    (data / "cache").mkdir()
    (data / "cache" / "theirs.npy").write_bytes(b"the user's cache")
    before = {path: path.stat().st_mtime_ns for path in data.rglob("*")}
    command = [
        sys.executable,
        str(BENCH),
        "--arch",
        "resnet18",
        "--n-images",
        "24",
        "--source-size",
        "64",
        "--image-size",
        "32",
        "--sparsities",
        "0,0.9",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path / "data"),
        "--json",
        str(tmp_path / "result.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predictions agree" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in data.rglob("*")} == before
    numbers = json.loads((tmp_path / "result.json").read_text())
    assert numbers["images"] == 24 and numbers["max_abs_prob_diff"] <= 1e-4
    assert numbers["original_images_per_s"] > 0 and numbers["prunecxr_images_per_s"] > 0
    assert numbers["speedup"] == pytest.approx(
        numbers["prunecxr_images_per_s"] / numbers["original_images_per_s"]
    )


def _check_precision_report(report: dict) -> None:
    """bench/precision.py's report at the tiny size ci/gpu_check.sh gives it on a CPU (1 seed,
    1 epoch, 120 test images; its numbers: docs/PRECISION.md)."""
    assert report["reference"]["precision"] == "fp64"
    assert report["reference"]["pies"] == int(0.05 * 120)
    ways = report["ways"]
    assert list(ways) == ["fp32", "tf32", "bf16", "bf16 body + fp32 head"]
    classes = list(get_schema("nih-cxr-lt").classes)
    for way in ways.values():
        by_class = way["max_abs_ap_difference_by_class"]
        assert list(by_class) == classes
        assert way["max_abs_ap_difference"] == max(d for d in by_class.values() if d is not None)
        assert 0 <= way["pies_in_common"] <= way["pies"] == int(0.05 * 120)
    # On a CPU tf32 is fp32's math, so it must give fp32's numbers exactly.
    assert report["tf32_is_fp32_here"] is True
    assert ways["tf32"] == ways["fp32"]
    assert ways["fp32"]["max_abs_ap_difference"] < 1e-3
    assert ways["bf16"]["most_ties_in_a_class"] > ways["fp32"]["most_ties_in_a_class"]
    decision = report["decision"]
    assert decision["ap_tolerance"] == 1e-3 and "0.001 of fp64" in decision["rule"]
    assert decision["fp32_qualifies"] == (
        ways["fp32"]["every_class_within_tolerance"] and ways["fp32"]["pie_set_identical"]
    )
    assert decision["tf32_qualifies"] == decision["fp32_qualifies"]
    assert decision["decides_the_cuda_default"] is False


def _gpu_check(out: Path, seconds: int = 540) -> subprocess.CompletedProcess:
    """ci/gpu_check.sh as the device run calls it, at tiny sizes on the CPU."""
    script = PROJECT_ROOT / "ci" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env["PRUNECXR_GPU_CHECK_SECONDS"] = str(seconds)
    command = ["bash", str(script), "--device", "cpu", "--small"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)


@pytest.mark.slow
def test_gpu_check_runs_small_on_the_cpu_and_makes_the_docs_tables(tmp_path):
    """ci/gpu_check.sh (bench/gpu.py, bench/precision.py, then the gpu tests) at its small size
    on the CPU (on a GPU: full size, docs/PERFORMANCE.md and docs/PRECISION.md)."""
    result = _gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + (tmp_path / "bench.txt").read_text()
    numbers = json.loads((tmp_path / "gpu.json").read_text())
    assert numbers["card"].startswith("CPU") and numbers["size"] == "small"
    assert numbers["complete"] and numbers["errors"] == {}
    train = numbers["train"]
    assert train["speedup"] == pytest.approx(
        train["prunecxr_images_per_s"] / train["original_images_per_s"]
    )
    assert [row["sparsity"] for row in numbers["sweep"]["cells"]] == [0.5, 0.7, 0.9]
    structured = numbers["structured"]
    assert [row["sparsity"] for row in structured] == [0.0, 0.5, 0.7, 0.9]
    assert all(a["macs"] > b["macs"] for a, b in zip(structured, structured[1:]))
    assert 0 <= numbers["precision"]["max_abs_ap_difference"] < 1
    # Ours against the model alone on the same card, each layout of each precision timed.
    assert train["model_only_images_per_s"] > 0 and numbers["sweep"]["model_only_images_per_s"] > 0
    layouts = {(row["precision"], row["channels_last"]) for row in numbers["layouts"]}
    assert layouts == {(p, last) for p in ("fp32", "tf32", "bf16") for last in (False, True)}
    tables = (tmp_path / "gpu-tables.md").read_text()
    fraction = train["prunecxr_images_per_s"] / train["model_only_images_per_s"]
    assert f"| training (compiled, as trained) | {train['prunecxr_images_per_s']:,.0f} |" in tables
    assert f"{fraction:.2f} (≥ 0.9: {'met' if fraction >= 0.9 else 'missed'})" in tables
    assert "| 0.9 |" in tables and "| fp32 |" in tables
    _check_precision_report(json.loads((tmp_path / "precision.json").read_text()))
    assert '"tf32_qualifies": true' in result.stdout
    assert "bench/precision.py: exit 0" in result.stdout and "gpu tests: exit 0" in result.stdout


@pytest.mark.slow
def test_gpu_check_cut_short_still_returns_what_it_measured(tmp_path):
    """A time limit that stops the benchmark midway: its JSON and tables are there, marked
    incomplete, and the script fails."""
    result = _gpu_check(tmp_path, seconds=135)  # 15 s (135 - 60 for precision - 60): its
    # work alone takes 21 s on the 2-core machine
    assert result.returncode != 0
    assert "bench/gpu.py: exit 124" in result.stdout
    numbers = json.loads((tmp_path / "gpu.json").read_text())
    assert numbers["complete"] is False and numbers["card"].startswith("CPU")
    assert "cut short after" in (tmp_path / "gpu-tables.md").read_text()


@pytest.mark.slow
def test_architecture_benchmark_prunes_and_times_each_sparsity(tmp_path):
    """bench/architectures.py at a tiny size (its numbers: docs/pruning.md, "Architectures")."""
    script = PROJECT_ROOT / "bench" / "architectures.py"
    command = [sys.executable, str(script), "--archs", "resnet18", "--image-size", "32"]
    command += ["--batch-size", "2", "--passes", "1", "--json", str(tmp_path / "a.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [row["sparsity"] for row in rows] == [0.0, 0.5, 0.7, 0.9]
    assert all(abs(row["achieved_sparsity"] - row["sparsity"]) <= 0.01 for row in rows)
    assert rows[0]["speedup"] == 1.0 and rows[-1]["mac_reduction"] > rows[1]["mac_reduction"]
    assert "| resnet18 | 0.9 |" in result.stdout
