"""GPU benchmark: prunecxr against the original study's pipeline on the same data and device.

Measures, on synthetic chest X-rays it writes as PNG files (full size: 1024 x 1024, 256 px input):
1. training images/s: prunecxr's loop (images held on the device, augmentation there, no sync
   per step; bf16 + channels_last + torch.compile + fused Adam on CUDA) against the original's
   (a DataLoader decoding and resizing every file every epoch, PIL flip/rotation, fp32, Adam);
2. sweep cell images/s: a prunecxr sweep cell (test tensor on the device, dense weights copied
   in place, pruned, evaluated) against the original's per-sparsity loop (reload the checkpoint,
   prune, a fresh DataLoader decoding every file, fp32);
3. structured pruning at 0.5/0.7/0.9: MACs, parameters and measured speed-up against dense;
4. bf16 against fp32 evaluation: the largest per-class AP difference.
Writes one JSON, saved again after every section (a run cut short by a time limit still leaves
what it measured: `complete` is false and `errors` names a section that failed); `--tables`
prints docs/PERFORMANCE.md's GPU section from one, "not measured" where a section is missing.
On the CPU it runs at small sizes (`--small`), which is how CI keeps it from rotting
(`ci/gpu_check.sh --device cpu --small`).

    python bench/gpu.py --out gpu.json                # a CUDA machine, full size, < 6 minutes
    python bench/gpu.py --small --out small.json      # any machine, tiny sizes
    python bench/gpu.py --tables gpu.json             # markdown for docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from prunecxr.cells import ModelSource, SourceCells, measure_speed
from prunecxr.data import SplitData, get_schema, load_split
from prunecxr.data.cache import decode_image
from prunecxr.data.labels import read_labels
from prunecxr.data.synthetic import write_synthetic
from prunecxr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import device_logits, per_class_metrics, sigmoid
from prunecxr.fitting import TrainState, train_one_epoch
from prunecxr.models import create_model
from prunecxr.pruning import count_macs, nonzero_parameters, prune_model
from prunecxr.runtime import CHANNELS_LAST_ON_CUDA, resolve_runtime
from prunecxr.specs import CellSettings, DataSpec, Finetune

SCHEMA = get_schema("nih-cxr-lt")
SIZES = {
    "full": {
        "arch": "resnet50",
        "source_size": 1024,
        "image_size": 256,
        "files": 384,  # 1024 px PNGs are slow to write; the original decodes them twice as often
        "batch_size": 256,
        "train_images": 10_240,  # the decoded files repeated: steady state, not warm-up
        "test_images": 8_192,
        "workers": 12,
        "original_epochs": 4,
    },
    "small": {
        "arch": "resnet18",
        "source_size": 96,
        "image_size": 32,
        "files": 48,
        "batch_size": 16,
        "train_images": 96,
        "test_images": 96,
        "workers": 1,
        "original_epochs": 1,
    },
}
SPARSITIES = (0.5, 0.7, 0.9)
WARMUP_STEPS = 3
# Targets, as fractions of the same card's model-only rate measured in the same run, and as
# multiples of the original pipeline's rate there (issue #24).
TARGETS = {
    "train": {"of_model_only": 0.9, "of_original": 10},
    "sweep": {"of_model_only": 0.8, "of_original": 10},
}


class OriginalDataset(Dataset):
    """The original's data path: decode + resize every file, transforms per image in PIL."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, train: bool):
        self.paths, self.labels, self.image_size = paths, labels, image_size
        steps = [transforms.ToPILImage()]
        if train:
            steps += [transforms.RandomHorizontalFlip(), transforms.RandomRotation(15)]
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = np.repeat(decode_image(self.paths[index], self.image_size)[..., None], 3, axis=2)
        return self.transform(image), torch.from_numpy(self.labels[index])


def train_original(paths, labels, size: dict, device) -> float:
    """Images/s of the original's training loop (fp32, NCHW, Adam, loss.item() per step)."""
    model = create_model(size["arch"], SCHEMA.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = OriginalDataset(paths, labels, size["image_size"], train=True)
    loader = DataLoader(
        data,
        batch_size=size["batch_size"],
        shuffle=True,
        num_workers=size["workers"],
        pin_memory=device.type == "cuda",
    )
    for epoch in range(1 + size["original_epochs"]):  # the first, untimed: cuDNN warms up
        if epoch == 1:
            started = time.perf_counter()
        for images, targets in loader:
            loss = F.binary_cross_entropy_with_logits(model(images.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
    return size["original_epochs"] * len(data) / (time.perf_counter() - started)


def train_ours(split: SplitData, size: dict, runtime) -> dict:
    """Images/s of prunecxr's training loop, after a first epoch that compiles and warms up."""
    torch.manual_seed(0)
    model = runtime.place_model(create_model(size["arch"], SCHEMA.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(0))
    data = DeviceImages(
        _repeat(split.images, size["train_images"]),
        runtime,
        _repeat(split.labels, size["train_images"]),
    )
    forward = runtime.compiled(model)
    started = time.perf_counter()
    train_one_epoch(state, data, size["batch_size"], runtime, forward)  # compiles, warms up
    first = time.perf_counter() - started
    started = time.perf_counter()
    train_one_epoch(state, data, size["batch_size"], runtime, forward)  # ends with a sync
    seconds = time.perf_counter() - started
    return {
        "images_per_s": len(data) / seconds,
        "first_epoch_s": first,
        "model": model,
        "optimizer": optimizer,
        "forward": forward,
    }


def model_only_training(ours: dict, size: dict, runtime) -> float:
    """Images/s of the training step alone on the same GPU: the same compiled model and fused
    Adam, one fixed batch already on the device (no data path at all): the ceiling of ours."""
    batch, targets = _fixed_batch(size, runtime), _fixed_targets(size, runtime)
    steps = max(1, size["train_images"] // size["batch_size"])
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            runtime.synchronize()
            started = time.perf_counter()
        with runtime.fp32_math(), runtime.autocast():
            logits = ours["forward"](batch).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        ours["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        ours["optimizer"].step()
    runtime.synchronize()
    return steps * size["batch_size"] / (time.perf_counter() - started)


@torch.inference_mode()
def model_only_inference(forward, size: dict, runtime) -> float:
    """Images/s of forward passes alone over one fixed batch on the device (no data path)."""
    batch = _fixed_batch(size, runtime)
    passes = max(1, size["test_images"] // size["batch_size"])
    with runtime.autocast():
        for _ in range(WARMUP_STEPS):
            forward(batch)
        runtime.synchronize()
        started = time.perf_counter()
        for _ in range(passes):
            forward(batch)
        runtime.synchronize()
    return passes * size["batch_size"] / (time.perf_counter() - started)


def inference_ceilings(model, size: dict, device: str) -> list[dict]:
    """Model-only inference images/s of every precision in both layouts (eager: one compile
    per combination would not fit a device call), so that each layout default is measured."""
    rows = []
    for precision in ("fp32", "tf32", "bf16"):
        for channels_last in (False, True):
            runtime = resolve_runtime(
                device, precision=precision, channels_last=channels_last, compile=False
            )
            placed = runtime.place_model(copy.deepcopy(model).float()).eval()
            rows.append(
                {
                    "precision": precision,
                    "channels_last": channels_last,
                    "images_per_s": model_only_inference(placed, size, runtime),
                }
            )
    return rows


def _fixed_batch(size: dict, runtime) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (size["batch_size"], 3, size["image_size"], size["image_size"])
    return runtime.place_batch(torch.randn(shape, generator=generator).to(runtime.device))


def _fixed_targets(size: dict, runtime) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (size["batch_size"], SCHEMA.num_classes)
    return torch.randint(0, 2, shape, generator=generator).float().to(runtime.device)


def sweep_original(checkpoint: Path, paths, size: dict, device) -> float:
    """Images/s of the original's prune loop: per sparsity reload, prune, fresh DataLoader."""
    warm = create_model(size["arch"], SCHEMA.num_classes).to(device).eval()
    with torch.inference_mode():  # cuDNN picks its kernels for these shapes once, untimed
        warm(
            torch.zeros(
                size["batch_size"], 3, size["image_size"], size["image_size"], device=device
            )
        )
    started = time.perf_counter()
    for sparsity in SPARSITIES:
        model = create_model(size["arch"], SCHEMA.num_classes)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        model = prune_model(model.to(device), "l1", sparsity, example_inputs=None).eval()
        labels = np.zeros((len(paths), SCHEMA.num_classes), np.float32)
        loader = DataLoader(
            OriginalDataset(paths, labels, size["image_size"], train=False),
            batch_size=size["batch_size"],
            num_workers=size["workers"],
            pin_memory=device.type == "cuda",
        )
        with torch.inference_mode():
            [model(images.to(device)).float().cpu() for images, _ in loader]
    return len(SPARSITIES) * len(paths) / (time.perf_counter() - started)


def sweep_ours(model, split: SplitData, data: DataSpec, size: dict, runtime) -> dict:
    """Per L1 cell: the whole cell (prune, evaluate, measure) and its evaluation alone."""
    dense = copy.deepcopy(model).cpu().float()
    source = ModelSource("bench", None, size["arch"], 0, "none", data, dense)
    test = DeviceImages(_repeat(split.images, size["test_images"]), runtime)
    settings = CellSettings(batch_size=size["batch_size"])
    cells = SourceCells(source, test, runtime, settings, Finetune())
    started = time.perf_counter()
    cells.compute("l1", SPARSITIES[0])  # compiles, warms up
    first = time.perf_counter() - started
    rows = []
    for sparsity in SPARSITIES:
        runtime.synchronize()
        started = time.perf_counter()
        result = cells.compute("l1", sparsity)
        runtime.synchronize()
        cell_seconds = time.perf_counter() - started
        started = time.perf_counter()
        device_logits(
            cells.working,
            test,
            runtime=runtime,
            batch_size=size["batch_size"],
            forward=cells.forward,
        )
        eval_seconds = time.perf_counter() - started
        rows.append(
            {
                "sparsity": sparsity,
                "cell_images_per_s": len(test) / cell_seconds,
                "eval_images_per_s": len(test) / eval_seconds,
                "latency_ms_batch1": result.measures["latency_ms_batch1"],
            }
        )
    # The cells' own compiled forward pass alone: the ceiling of a cell at this precision.
    model_only = model_only_inference(cells.forward, size, runtime)
    return {"first_cell_s": first, "cells": rows, "model_only_images_per_s": model_only}


def structured(model, split: SplitData, size: dict, runtime) -> list[dict]:
    """MACs, parameters and measured throughput of channel-pruned models against dense."""
    example = torch.zeros(1, 3, size["image_size"], size["image_size"], device=runtime.device)
    test = DeviceImages(_repeat(split.images, 4 * size["batch_size"]), runtime)
    dense = runtime.place_model(copy.deepcopy(model).float()).eval()
    rows = []
    for sparsity in (0.0, *SPARSITIES):
        pruned = prune_model(copy.deepcopy(dense), "structured", sparsity, example_inputs=example)
        pruned = runtime.place_model(pruned).eval()
        speed = measure_speed(pruned, test, runtime, size["batch_size"], [])
        rows.append(
            {
                "sparsity": sparsity,
                "macs": count_macs(pruned, example),
                "params": nonzero_parameters(pruned),
                "throughput_images_per_s": speed["throughput_images_per_s"],
            }
        )
    for row in rows:
        row["mac_reduction"] = rows[0]["macs"] / row["macs"]
        row["speedup"] = row["throughput_images_per_s"] / rows[0]["throughput_images_per_s"]
    return rows


def precision(model, split: SplitData, size: dict, device: str) -> dict:
    """bf16 against fp32 evaluation of the same model: the largest per-class AP difference."""
    aps = {}
    for way in ("fp32", "bf16"):
        runtime = resolve_runtime(device, precision=way, compile=False)
        placed = runtime.place_model(copy.deepcopy(model).float())
        logits, _ = device_logits(
            placed, split.images, runtime=runtime, batch_size=size["batch_size"]
        )
        aps[way] = per_class_metrics(sigmoid(logits.numpy()), split.labels, SCHEMA.classes).ap
    return {"max_abs_ap_difference": float((aps["bf16"] - aps["fp32"]).abs().max())}


def _repeat(array: np.ndarray, count: int) -> np.ndarray:
    return np.resize(np.asarray(array), (count, *array.shape[1:]))


def _describe(runtime) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if runtime.on_cuda:
        info["card"] = torch.cuda.get_device_name(runtime.device)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    else:
        info["card"] = f"CPU ({torch.get_num_threads()} threads)"
    return info


def _nvidia_driver() -> str:
    import subprocess

    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args, save=lambda result: None) -> dict:
    """Every section in turn; `save(result)` after each, so that a run cut short keeps them."""
    size = SIZES["small" if args.small else "full"]
    runtime = resolve_runtime(args.device)  # training: the device's fast path
    analysis = resolve_runtime(args.device, for_analysis=True)  # sweep cells: fp32
    started = time.perf_counter()
    result = {
        **_describe(runtime),
        "size": "small" if args.small else "full",
        "settings": dict(size),
        "training_runtime": runtime.describe(),
        "sweep_runtime": analysis.describe(),
        "complete": False,
        "errors": {},
    }

    def section(name: str, measure, keep: bool = True) -> object:
        """measure() (kept as result[name]), then saved; a failure is noted under its name and
        the next section runs."""
        try:
            value = measure()
        except Exception as error:  # the other sections' numbers still count
            result["errors"][name] = f"{type(error).__name__}: {error}"
            value = None
        else:
            if keep:
                result[name] = value
        result["seconds"] = time.perf_counter() - started
        save(result)
        return value

    save(result)  # the card and settings, even if nothing else gets measured
    with tempfile.TemporaryDirectory(prefix="prunecxr-gpu-bench-") as scratch:
        root = Path(scratch)
        splits = {"train": 8, "val": 8, "test": size["files"]}
        write_synthetic(SCHEMA, root, splits, image_size=size["source_size"], seed=0)
        labels = read_labels(SCHEMA, root, "test")
        paths = [root / image_id for image_id in labels.image_ids]
        data = DataSpec(
            SCHEMA.name, str(root), str(root), size["image_size"], cache_dir=str(root / "cache")
        )
        built = time.perf_counter()
        split = load_split(
            SCHEMA,
            root,
            root,
            "test",
            size["image_size"],
            cache_dir=root / "cache",
            num_workers=size["workers"],
        )
        result["cache_build_images_per_s"] = len(paths) / (time.perf_counter() - built)
        ours = section("train", lambda: train_ours(split, size, runtime), keep=False)
        if ours is None:
            return result
        result["train"] = {
            "prunecxr_images_per_s": ours["images_per_s"],
            "prunecxr_first_epoch_s": ours["first_epoch_s"],
        }
        save(result)
        ceiling = section(
            "train_model_only", lambda: model_only_training(ours, size, runtime), keep=False
        )
        if ceiling is not None:
            result["train"]["model_only_images_per_s"] = ceiling
            save(result)
        section("sweep", lambda: sweep_ours(ours["model"], split, data, size, analysis))
        section("layouts", lambda: inference_ceilings(ours["model"], size, args.device))
        section("structured", lambda: structured(ours["model"], split, size, analysis))
        section("precision", lambda: precision(ours["model"], split, size, args.device))
        # The original pipeline last: the slowest part, and only the denominator of the ratios.
        original = section(
            "train_original",
            lambda: train_original(paths, split.labels, size, runtime.device),
            keep=False,
        )
        if original is not None:
            result["train"]["original_images_per_s"] = original
            result["train"]["speedup"] = ours["images_per_s"] / original
            save(result)
        if "sweep" in result:
            checkpoint = root / "dense.pt"
            torch.save(ours["model"].state_dict(), checkpoint)
            rate = section(
                "sweep_original",
                lambda: sweep_original(checkpoint, paths, size, runtime.device),
                keep=False,
            )
            if rate is not None:
                result["sweep"]["original_images_per_s"] = rate
                save(result)
    result["complete"] = not result["errors"]
    result["seconds"] = time.perf_counter() - started
    save(result)
    return result


NOT_MEASURED = "not measured"


def _rate(value) -> str:
    return NOT_MEASURED if value is None else f"{value:,.0f}"


def _target_row(what: str, ours, model_only, original, target: dict) -> str:
    """One row of the main table: ours, its ceiling and the original, with the targets met
    or not (a ratio not measured is neither)."""

    def judged(numerator, denominator, goal: float, unit: str) -> str:
        if numerator is None or denominator is None:
            return f"{NOT_MEASURED} (≥ {goal:g}{unit})"
        ratio = numerator / denominator
        verdict = "met" if ratio >= goal else "missed"
        return f"{ratio:.2f}{unit} (≥ {goal:g}{unit}: {verdict})"

    return (
        f"| {what} | {_rate(ours)} | {_rate(model_only)} | "
        f"{judged(ours, model_only, target['of_model_only'], '')} | {_rate(original)} | "
        f"{judged(ours, original, target['of_original'], 'x')} |"
    )


def tables(result: dict) -> str:
    """docs/PERFORMANCE.md's section for one benchmark run (complete or cut short)."""
    train, sweep = result.get("train", {}), result.get("sweep", {})
    cells = [row["cell_images_per_s"] for row in sweep.get("cells", [])]
    cell = float(np.median(cells)) if cells else None
    seconds = result.get("seconds", 0.0)
    state = "whole benchmark" if result.get("complete", True) else "cut short after"
    precision = result.get("sweep_runtime", {}).get("precision", "fp32")
    lines = [
        f"Card: {result['card']}; driver {result.get('driver', '-')}; torch {result['torch']}"
        f"{'; CUDA ' + result['cuda'] if result.get('cuda') else ''}; size `{result['size']}` "
        f"({result['settings']['arch']}, {result['settings']['source_size']} px PNGs, "
        f"{result['settings']['image_size']} px input, batch {result['settings']['batch_size']}); "
        f"{state} {seconds:.0f} s.",
        "",
        "| images/s | prunecxr | model alone, same card | fraction (target) "
        "| original pipeline | ratio (target) |",
        "| --- | --- | --- | --- | --- | --- |",
        _target_row(
            "training (compiled, as trained)",
            train.get("prunecxr_images_per_s"),
            train.get("model_only_images_per_s"),
            train.get("original_images_per_s"),
            TARGETS["train"],
        ),
        _target_row(
            f"sweep cell (L1, {precision}, median of 3)",
            cell,
            sweep.get("model_only_images_per_s"),
            sweep.get("original_images_per_s"),
            TARGETS["sweep"],
        ),
        "",
    ]
    if train:
        lines.append(
            f"First training epoch (compile + warm-up): {train['prunecxr_first_epoch_s']:.1f} s."
        )
    if sweep:
        lines.append(f"First sweep cell: {sweep['first_cell_s']:.1f} s.")
    if "cache_build_images_per_s" in result:
        lines.append(f"Cache build: {result['cache_build_images_per_s']:,.0f} images/s.")
    if sweep:
        lines += [
            "",
            "| L1 sparsity | whole cell, images/s | evaluation only, images/s | latency, batch 1 (ms) |",
            "| --- | --- | --- | --- |",
        ]
        for row in sweep["cells"]:
            lines.append(
                f"| {row['sparsity']:g} | {row['cell_images_per_s']:,.0f} | "
                f"{row['eval_images_per_s']:,.0f} | {row['latency_ms_batch1']:.2f} |"
            )
    if "layouts" in result:
        lines += [
            "",
            "| model alone, eager, images/s | NCHW | channels_last | faster | prunecxr's default |",
            "| --- | --- | --- | --- | --- |",
        ]
        for precision, (nchw, last) in _layout_pairs(result["layouts"]).items():
            faster = "channels_last" if last > nchw else "NCHW"
            default = "channels_last" if CHANNELS_LAST_ON_CUDA[precision] else "NCHW"
            lines.append(f"| {precision} | {nchw:,.0f} | {last:,.0f} | {faster} | {default} |")
    if "structured" in result:
        lines += [
            "",
            "| structured sparsity | MACs | parameters | MAC reduction | measured speed-up |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in result["structured"]:
            lines.append(
                f"| {row['sparsity']:g} | {row['macs'] / 1e9:.3f} G | {row['params'] / 1e6:.2f} M | "
                f"{row['mac_reduction']:.2f}x | {row['speedup']:.2f}x |"
            )
    if "precision" in result:
        lines += [
            "",
            f"bf16 against fp32 evaluation: largest per-class AP difference "
            f"{result['precision']['max_abs_ap_difference']:.4f}.",
        ]
    for name, error in result.get("errors", {}).items():
        lines += ["", f"Section `{name}` failed: {error}"]
    return "\n".join(lines) + "\n"


def _layout_pairs(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """precision -> (NCHW images/s, channels_last images/s)."""
    rates = {(row["precision"], row["channels_last"]): row["images_per_s"] for row in rows}
    precisions = dict.fromkeys(row["precision"] for row in rows)
    return {p: (rates[(p, False)], rates[(p, True)]) for p in precisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU, CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--tables", metavar="JSON", help="print the markdown tables of a result")
    args = parser.parse_args()
    if args.tables:
        sys.stdout.write(tables(json.loads(Path(args.tables).read_text())))
        return
    result = run(args, save=lambda result: _save(result, args.out))
    print(json.dumps(result, indent=2))
    if result["errors"]:
        sys.exit(1)


def _save(result: dict, out: str | None) -> None:
    """The result so far, replacing the file whole (a reader never sees half of it)."""
    if out:
        partial = Path(out).with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(out)


if __name__ == "__main__":
    main()
