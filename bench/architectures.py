"""Structured pruning per architecture: what it removes and the speed-up it buys, measured.

For each architecture (ResNet50, DenseNet121, ViT-B/16), prunes a randomly initialized model
with prunecxr's structured pruning (torch-pruning; the channel ratio searched to the target
sparsity) at 0.5, 0.7 and 0.9, and times dense and pruned forward passes side by side on the
same device (median of timed passes after a warm-up). Speed does not depend on the weights'
values, so no training is needed. Prints a markdown table (docs/pruning.md) and, with
--json, writes the numbers.

    python bench/architectures.py --json docs/architectures-cpu.json    # 2-core CPU: minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from prunecxr.models import create_model
from prunecxr.pruning import count_macs, count_prunable, prune_model

ARCHITECTURES = ("resnet50", "densenet121", "vit_b_16")
SPARSITIES = (0.5, 0.7, 0.9)


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, batch: torch.Tensor, passes: int) -> float:
    model(batch)  # warm-up
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        model(batch)
        seconds.append(time.perf_counter() - started)
    return len(batch) / statistics.median(seconds)


def measure(arch: str, args) -> list[dict]:
    torch.manual_seed(0)
    dense = create_model(arch, 20, image_size=args.image_size).eval()
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    total, _ = count_prunable(dense)
    rows = []
    for sparsity in (0.0, *SPARSITIES):
        started = time.perf_counter()
        pruned = prune_model(copy.deepcopy(dense), "structured", sparsity, example_inputs=example)
        prune_seconds = time.perf_counter() - started
        rows.append(
            {
                "arch": arch,
                "sparsity": sparsity,
                "achieved_sparsity": 1 - count_prunable(pruned)[0] / total,
                "macs": count_macs(pruned, example),
                "images_per_s": images_per_second(pruned.eval(), batch, args.passes),
                "prune_seconds": prune_seconds,
            }
        )
        print(f"{arch} {sparsity:g}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["mac_reduction"] = rows[0]["macs"] / row["macs"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| architecture | sparsity | reached | MAC reduction | measured speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["sparsity"]:
            lines.append(
                f"| {row['arch']} | {row['sparsity']:g} | {row['achieved_sparsity']:.3f} | "
                f"{row['mac_reduction']:.2f}x | {row['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [row for arch in args.archs.split(",") for row in measure(arch, args)]
    print(table(rows))
    result = {
        "device": f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
