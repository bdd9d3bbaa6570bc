"""Sweep evaluation throughput: the original study's way vs prunecxr's, side by side.

The same synthetic test set and the same checkpoint are evaluated after global L1 pruning at
each sparsity, two ways:
1. original: per sparsity, reload the checkpoint from disk and build a fresh DataLoader that
   decodes and resizes every image file and normalizes it per image; fp32 (as VITA-Group/PruneCXR).
2. prunecxr: decode once into the uint8 cache (its build time is counted), hold the test tensor
   in memory, copy the in-memory model per sparsity, normalize per batch; as a sweep cell:
   channels_last on CUDA, analysis-grade fp32.
Prints images evaluated per second for both, their ratio, and the largest difference between
the two ways' predicted probabilities.

    python bench/sweep_throughput.py                  # CPU defaults (a few minutes on 2 cores)
    python bench/sweep_throughput.py --device cuda --n-images 4096 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from prunecxr.data import get_schema, load_split
from prunecxr.data.cache import decode_image
from prunecxr.data.labels import read_labels
from prunecxr.data.synthetic import write_synthetic
from prunecxr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from prunecxr.evaluate import predict_logits, sigmoid
from prunecxr.models import create_model, load_state_file
from prunecxr.pruning import prune_model
from prunecxr.runtime import resolve_runtime

SCHEMA = get_schema("nih-cxr-lt")


class FileDataset(Dataset):
    """The original data path: decode + resize the file, then ToTensor + Normalize per image."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = TF.to_tensor(decode_image(self.paths[index], self.image_size)).expand(3, -1, -1)
        return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def original_way(checkpoint: Path, paths, args, device) -> tuple[float, list[np.ndarray]]:
    started, outputs = time.perf_counter(), []
    for sparsity in args.sparsities:
        model = create_model(args.arch, SCHEMA.num_classes)
        model.load_state_dict(load_state_file(checkpoint))
        model = prune_model(model, "l1", sparsity, example_inputs=None).to(device).eval()
        loader = DataLoader(
            FileDataset(paths, args.image_size),
            batch_size=args.batch_size,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        with torch.inference_mode():
            logits = [model(batch.to(device)).float().cpu() for batch in loader]
        outputs.append(sigmoid(torch.cat(logits).numpy()))
    _sync(device)
    return time.perf_counter() - started, outputs


def prunecxr_way(
    checkpoint: Path, data_dir: Path, cache_dir: Path, args, runtime
) -> tuple[float, list[np.ndarray]]:
    started, outputs = time.perf_counter(), []
    test = load_split(
        SCHEMA,
        data_dir,
        data_dir,
        "test",
        args.image_size,
        cache_dir=cache_dir,
        num_workers=args.workers,
    )
    images = np.array(test.images)
    source = create_model(args.arch, SCHEMA.num_classes)
    source.load_state_dict(load_state_file(checkpoint))
    for sparsity in args.sparsities:
        model = prune_model(copy.deepcopy(source), "l1", sparsity, example_inputs=None)
        model = runtime.place_model(model).eval()
        logits = predict_logits(model, images, runtime=runtime, batch_size=args.batch_size)
        outputs.append(sigmoid(logits))
    _sync(runtime.device)
    return time.perf_counter() - started, outputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(args, scratch: Path) -> tuple[Path, Path, list[Path]]:
    """The data (--data-dir, only read; else generated in `scratch`) and a checkpoint in
    `scratch`: the benchmark writes nowhere else."""
    data_dir = Path(args.data_dir) if args.data_dir else scratch / "data"
    if not args.data_dir:
        sizes = {"train": 8, "val": 8, "test": args.n_images}
        write_synthetic(SCHEMA, data_dir, sizes, image_size=args.source_size, seed=0)
    elif not (data_dir / SCHEMA.label_file("test")).exists():
        raise SystemExit(f"error: {data_dir} holds no {SCHEMA.label_file('test')}")
    checkpoint = scratch / "chkpt.pt"
    torch.manual_seed(0)
    torch.save({"weights": create_model(args.arch, SCHEMA.num_classes).state_dict()}, checkpoint)
    test = read_labels(SCHEMA, data_dir, "test")
    return data_dir, checkpoint, [data_dir / image_id for image_id in test.image_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--n-images", type=int, default=256, help="test images")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the PNG files")
    parser.add_argument("--image-size", type=int, default=256, help="model input side")
    parser.add_argument(
        "--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.5, 0.9]
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader / cache workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--data-dir", help="read the test images here (only read) instead of generating them"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    runtime = resolve_runtime(args.device, for_analysis=True)  # as a sweep cell: fp32
    device = runtime.device
    with tempfile.TemporaryDirectory(prefix="prunecxr-bench-") as scratch:
        data_dir, checkpoint, paths = prepare(args, Path(scratch))
        original_s, original = original_way(checkpoint, paths, args, device)
        # Our way pays for building its cache (a fresh one in the scratch folder) in the run.
        ours_s, ours = prunecxr_way(checkpoint, data_dir, Path(scratch) / "cache", args, runtime)
    evaluated = len(paths) * len(args.sparsities)
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "arch": args.arch,
        "images": len(paths),
        "sparsities": args.sparsities,
        "source_size": args.source_size,
        "image_size": args.image_size,
        "original_images_per_s": evaluated / original_s,
        "prunecxr_images_per_s": evaluated / ours_s,
        "speedup": original_s / ours_s,
        "max_abs_prob_diff": float(max(np.abs(a - b).max() for a, b in zip(original, ours))),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    # fp32 on both sides; on CUDA the original way may use TF32 convolutions (PyTorch's default).
    tolerance = 1e-2 if device.type == "cuda" else 1e-4
    if result["max_abs_prob_diff"] > tolerance:
        raise SystemExit(f"predictions differ by {result['max_abs_prob_diff']:.2e} > {tolerance}")
    print(f"predictions agree within {tolerance}")


if __name__ == "__main__":
    main()
