"""Do the analysis's numbers depend on the evaluation precision? Each way against fp64, measured.

Trains the demo's model (ResNet18 on the demo's synthetic data, `prunecxr.stages.study` settings) for
each seed in fp32, then evaluates every model dense and L1-pruned at the PIE sparsity:
- the reference: a float64 copy of the model on float64 inputs, outside autocast (on
  `--reference-device`, by default `--device`),
1. fp32, strict (no TF32 anywhere),
2. tf32: TF32 cuDNN convolutions, IEEE matmuls (on a CPU the same math as fp32),
3. bf16 autocast throughout (the training fast path),
4. bf16 body with an fp32 classifier head (a candidate for fast analysis-grade evaluation).
Prints and writes per way, against fp64: the largest |ΔAP| of any class over every seed and
sparsity, the same per class, how many of the fp64 PIEs it finds, and the most tied
probabilities in one class's column. Its `decision` applies the rule for making TF32 the
sweep's default on CUDA (every class's AP within 1e-3 of fp64 and the same PIE set), to tf32
and, as a baseline, to strict fp32; only a GPU with TF32 can decide it.

    python bench/precision.py --json docs/precision-cpu.json   # docs/PRECISION.md: its time
    python bench/precision.py --device cuda                    # decides TF32 (ci/gpu_check.sh)
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
from prunecxr.data.transforms import normalize
from prunecxr.evaluate import per_class_metrics, predict_logits, sigmoid
from prunecxr.fitting import create_state, fit, open_splits
from prunecxr.pruning import prune_model
from prunecxr.runtime import resolve_runtime
from prunecxr.specs import TrainConfig
from prunecxr.stages.study import DEMO_DRAW_SIZE, DEMO_SPLIT_SIZES, DEMO_TRAIN

NIH = get_schema("nih-cxr-lt")
FP32_HEAD = "bf16 body + fp32 head"
PRECISION_OF_WAY = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", FP32_HEAD: "bf16"}
WAYS = tuple(PRECISION_OF_WAY)
SPARSITIES = (0.0, PIE_SPARSITY)
AP_TOLERANCE = 1e-3
RULE = (
    "TF32 becomes the sweep's default on CUDA if and only if every class's AP stays within "
    f"{AP_TOLERANCE:g} of fp64 (every seed and sparsity) and its PIE set is identical to fp64's."
)


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
    if way == FP32_HEAD:
        model.fc = Fp32Head(model.fc)
    runtime = resolve_runtime(device, precision=PRECISION_OF_WAY[way], compile=False)
    return sigmoid(predict_logits(runtime.place_model(model), images, runtime=runtime))


@torch.inference_mode()
def fp64_logits(
    model: nn.Module, images: np.ndarray, device: str, batch_size: int = 256
) -> np.ndarray:
    """(N, C) float64 logits of a float64 copy of `model`, outside autocast."""
    model = copy.deepcopy(model).double().to(device).eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).to(device)
        # The other ways' float32 normalization, widened: every way starts from the same
        # inputs, so what differs is only the model's arithmetic.
        batch = normalize(chunk.unsqueeze(1)).double()
        with torch.autocast(torch.device(device).type, enabled=False):
            outputs.append(model(batch).cpu())
    return torch.cat(outputs).numpy()


def pie_rows(probs: dict, seeds: int) -> set[int]:
    dense = np.mean([probs[(s, 0.0)] for s in range(seeds)], axis=0)
    pruned = np.mean([probs[(s, PIE_SPARSITY)] for s in range(seeds)], axis=0)
    corr = image_correlations(dense, pruned)
    order = np.argsort(np.where(np.isnan(corr), np.inf, corr), kind="stable")
    return set(order[: int(PIE_FRACTION * len(corr))].tolist())


def most_ties_in_a_class(probs: dict) -> int:
    return max(len(column) - len(np.unique(column)) for p in probs.values() for column in p.T)


def max_ap_difference_by_class(probs: dict, reference: dict, labels: np.ndarray) -> np.ndarray:
    """(C,) the largest |ΔAP| of each class over every (seed, sparsity); NaN for a class
    without positives in `labels`."""

    def aps(p):
        return per_class_metrics(p, labels, NIH.classes).ap.to_numpy()

    deltas = np.abs([aps(probs[key]) - aps(reference[key]) for key in reference])
    return np.fmax.reduce(deltas, axis=0)  # fmax: NaN only where every entry is NaN


def compare(probs: dict, reference: dict, reference_pies: set[int], labels, seeds: int) -> dict:
    by_class = max_ap_difference_by_class(probs, reference, labels)
    found = pie_rows(probs, seeds)
    defined = by_class[~np.isnan(by_class)]
    return {
        "max_abs_ap_difference": float(defined.max()),
        "max_abs_ap_difference_by_class": {
            name: None if np.isnan(delta) else float(delta)
            for name, delta in zip(NIH.classes, by_class)
        },
        "every_class_within_tolerance": bool(np.all(defined <= AP_TOLERANCE)),
        "pies_in_common": len(found & reference_pies),
        "pies": len(reference_pies),
        "pie_set_identical": found == reference_pies,
        "most_ties_in_a_class": most_ties_in_a_class(probs),
    }


def passes_rule(way: dict) -> bool:
    return way["every_class_within_tolerance"] and way["pie_set_identical"]


def tf32_is_fp32_on(device: str) -> bool:
    """No TF32 on a CPU nor on a GPU before Ampere: the tf32 way is then fp32's math."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN["max_epochs"])
    parser.add_argument("--n-test", type=int, default=DEMO_SPLIT_SIZES["test"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-device", help="where the fp64 reference runs [--device]")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reference_device = args.reference_device or args.device
    data = Path(tempfile.mkdtemp(prefix="prunecxr-precision-"))
    sizes = {**DEMO_SPLIT_SIZES, "test": args.n_test}
    write_synthetic(NIH, data, sizes, image_size=DEMO_DRAW_SIZE, seed=0)
    models = train_models(data, args)
    test = open_splits(demo_config(data, args).data)["test"]
    images = np.array(test.images)
    pruned = {
        (seed, k): prune_model(copy.deepcopy(model), "l1", k, example_inputs=None)
        for seed, model in enumerate(models)
        for k in SPARSITIES
    }
    reference = {
        key: sigmoid(fp64_logits(m, images, reference_device)) for key, m in pruned.items()
    }
    probs = {
        way: {key: probabilities(m, images, way, args.device) for key, m in pruned.items()}
        for way in WAYS
    }

    reference_pies = pie_rows(reference, args.seeds)
    ways = {
        way: compare(probs[way], reference, reference_pies, test.labels, args.seeds) for way in WAYS
    }
    tf32_is_fp32 = tf32_is_fp32_on(args.device)
    result = {
        "device": args.device,
        "reference_device": reference_device,
        "torch": torch.__version__,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "test_images": len(images),
        "sparsities": list(SPARSITIES),
        "tf32_is_fp32_here": tf32_is_fp32,
        "reference": {
            "precision": "fp64",
            "pies": len(reference_pies),
            "most_ties_in_a_class": most_ties_in_a_class(reference),
        },
        "ways": ways,
        "decision": {
            "rule": RULE,
            "ap_tolerance": AP_TOLERANCE,
            "tf32_qualifies": passes_rule(ways["tf32"]),
            "fp32_qualifies": passes_rule(ways["fp32"]),
            # Where tf32 is fp32's math, tf32_qualifies says nothing about TF32.
            "decides_the_cuda_default": not tf32_is_fp32,
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
