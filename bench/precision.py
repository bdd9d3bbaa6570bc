"""Do the analysis's numbers depend on the evaluation precision? bf16 against fp32, measured.

Trains the demo's model (ResNet18 on the demo's synthetic data, `prunecxr.stages.study` settings) for
each seed in fp32, then evaluates every model dense and L1-pruned at the PIE sparsity three ways:
1. fp32 (the reference; on CUDA without TF32),
2. bf16 autocast throughout (the training fast path),
3. bf16 body with an fp32 classifier head (a candidate for fast analysis-grade evaluation).
Prints and writes per way: the largest |ΔAP| of any class, seed and sparsity against fp32, how
many of the fp32 PIEs it finds, and the most tied probabilities in one class's column.

    python bench/precision.py --json docs/precision-cpu.json   # 3 min 8 s with the demo of 2026-11-27
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunecxr.analysis.pies import PIE_FRACTION, PIE_SPARSITY, image_correlations
from prunecxr.data import get_schema
from prunecxr.data.synthetic import write_synthetic
from prunecxr.evaluate import per_class_metrics, predict_logits, sigmoid
from prunecxr.fitting import create_state, fit, open_splits
from prunecxr.pruning import prune_model
from prunecxr.runtime import resolve_runtime
from prunecxr.specs import TrainConfig
from prunecxr.stages.study import DEMO_DRAW_SIZE, DEMO_SPLIT_SIZES, DEMO_TRAIN

NIH = get_schema("nih-cxr-lt")
WAYS = ("fp32", "bf16", "bf16 body + fp32 head")


class Fp32Head(nn.Module):
    """A classifier run outside autocast, on fp32 features."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float())


def demo_config(data: Path, args, seed: int = 0) -> TrainConfig:
    """The demo's training settings on `data`, fp32, with a cache inside the scratch folder."""
    return TrainConfig.from_flat(
        dataset=NIH.name,
        data_dir=str(data),
        label_dir=str(data),
        **{**DEMO_TRAIN, "max_epochs": args.epochs},
        seed=seed,
        device=args.device,
        precision="fp32",
        cache_dir=str(data / "cache"),
    )


def train_models(data: Path, args) -> list[nn.Module]:
    models = []
    for seed in range(args.seeds):
        config = demo_config(data, args, seed)
        runtime = resolve_runtime(args.device, precision="fp32")
        state = create_state(config, NIH.num_classes, runtime)
        fit(state, config, open_splits(config.data), runtime, lambda _: None)
        state.model.load_state_dict(state.best_weights)
        models.append(state.model.eval())
    return models


def probabilities(model: nn.Module, images: np.ndarray, way: str, device: str) -> np.ndarray:
    model = copy.deepcopy(model)
    if way == WAYS[2]:
        model.fc = Fp32Head(model.fc)
    runtime = resolve_runtime(device, precision="fp32" if way == WAYS[0] else "bf16")
    return sigmoid(predict_logits(runtime.place_model(model), images, runtime=runtime))


def pie_rows(probs: dict, seeds: int) -> set[int]:
    dense = np.mean([probs[(s, 0.0)] for s in range(seeds)], axis=0)
    pruned = np.mean([probs[(s, PIE_SPARSITY)] for s in range(seeds)], axis=0)
    corr = image_correlations(dense, pruned)
    order = np.argsort(np.where(np.isnan(corr), np.inf, corr), kind="stable")
    return set(order[: int(PIE_FRACTION * len(corr))].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN["max_epochs"])
    parser.add_argument("--n-test", type=int, default=DEMO_SPLIT_SIZES["test"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="prunecxr-precision-"))
    sizes = {**DEMO_SPLIT_SIZES, "test": args.n_test}
    write_synthetic(NIH, data, sizes, image_size=DEMO_DRAW_SIZE, seed=0)
    models = train_models(data, args)
    test = open_splits(demo_config(data, args).data)["test"]
    images = np.array(test.images)
    probs = {
        way: {
            (seed, k): probabilities(
                prune_model(copy.deepcopy(model), "l1", k, example_inputs=None),
                images,
                way,
                args.device,
            )
            for seed, model in enumerate(models)
            for k in (0.0, PIE_SPARSITY)
        }
        for way in WAYS
    }

    def aps(p):
        return per_class_metrics(p, test.labels, NIH.classes).ap.to_numpy()

    reference_pies = pie_rows(probs[WAYS[0]], args.seeds)
    result = {"device": args.device, "seeds": args.seeds, "test_images": len(images), "ways": {}}
    for way in WAYS:
        deltas = [
            np.nanmax(np.abs(aps(probs[way][key]) - aps(probs[WAYS[0]][key]))) for key in probs[way]
        ]
        ties = max(
            len(column) - len(np.unique(column)) for p in probs[way].values() for column in p.T
        )
        found = pie_rows(probs[way], args.seeds)
        result["ways"][way] = {
            "max_abs_ap_difference": float(max(deltas)),
            "pies_in_common": len(found & reference_pies),
            "pies": len(reference_pies),
            "most_ties_in_a_class": int(ties),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
