"""Sweep cells, computed: a `Cell` is one (source model, method, sparsity) of the paper's
grid; `SourceCells` prunes and evaluates the cells of one source model on one device and measures
their size and speed. Plain torch: the prune and sweep stages (stages/prune.py) log the results."""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunecxr.data import SplitData
from prunecxr.data.transforms import normalize
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import Stopwatch, device_logits, sigmoid
from prunecxr.fitting import finetune_model, open_split
from prunecxr.pruning import (
    count_macs,
    count_prunable,
    nonzero_parameters,
    prune_model,
    zeros_stay_zero,
)
from prunecxr.runtime import Runtime, portable_model
from prunecxr.specs import CellSettings, DataSpec, Finetune


@dataclass(frozen=True)
class ModelSource:
    """A model to prune: the unpruned network, where it came from, and its settings."""

    uri: str  # runs:/..., models:/... or the checkpoint file's absolute path
    run_id: str | None  # the train run that logged it; None for a checkpoint file
    arch: str
    seed: int
    pretrained: str
    data: DataSpec
    model: nn.Module
    sha256: str | None = None  # a checkpoint file's digest

    @property
    def key(self) -> str:
        """Identifies the model: its train run, or the checkpoint file's path, seed and bytes."""
        return self.run_id or f"{self.uri}#seed{self.seed}#{self.sha256[:12]}"

    def params(self) -> dict:
        """The source's params on a prune run (docs/ARCHITECTURE.md, "MLflow names", plus
        where its data and file are)."""
        params = {
            "dataset": self.data.dataset,
            "arch": self.arch,
            "seed": self.seed,
            "image_size": self.data.image_size,
            "pretrained": self.pretrained,
            "source_run_id": self.run_id or "",
            "model_uri": self.uri,
            "data_dir": self.data.data_dir,
            "label_dir": self.data.label_dir,
            "cache_dir": self.data.cache_dir,
            "preprocess": self.data.preprocess,
        }
        if self.data.skip_bad_images:
            params["skip_bad_images"] = True
        if self.sha256:
            params.update(checkpoint_path=self.uri, checkpoint_sha256=self.sha256)
        return params


# Random masks are drawn per (seed, sparsity) from a CPU generator (pruning.prune_random);
# cells of the earlier nested, device-drawn masks have keys without this.
MASK_SCHEMES = {"random": "masks-per-cell-cpu"}


@dataclass(frozen=True)
class Cell:
    """One (model, method, sparsity) of a sweep: its key (how runs are found again) and the
    name of its prune run."""

    source: ModelSource
    method: str
    sparsity: float

    @property
    def key(self) -> str:
        """A finished cell of a continued sweep is reused only while its key holds; a method
        whose masks changed carries its mask scheme, so cells made the old way are redone."""
        scheme = MASK_SCHEMES.get(self.method)
        suffix = f"|{scheme}" if scheme else ""
        return f"{self.source.key}|{self.method}|{self.sparsity:g}{suffix}"

    @property
    def run_name(self) -> str:
        return f"prune-{self.method}-{self.sparsity:g}-seed{self.source.seed}"


@functools.lru_cache(maxsize=8)
def test_split(data: DataSpec, num_workers: int = 0) -> SplitData:
    """The cached test split of a source model's data, read fully into memory once per
    process (every cell of every model of that data evaluates on it)."""
    split = open_split(data, "test", num_workers=num_workers)
    return SplitData(split.image_ids, np.array(split.images), split.labels)


@functools.lru_cache(maxsize=2)
def _train_split(data: DataSpec) -> SplitData:
    return open_split(data, "train")


def _finetune(model: nn.Module, source: ModelSource, finetune: Finetune, runtime) -> None:
    """Fine-tune a pruned model; its pruned weights stay zero."""
    with zeros_stay_zero(model):
        finetune_model(
            model, _train_split(source.data), finetune, seed=source.seed, runtime=runtime
        )


TIMED_REPEATS = 20  # timed forward passes behind each latency (their median)


WARMUP_PASSES = 3


@dataclass
class CellResult:
    probs: np.ndarray  # (N, C) test probabilities
    measures: dict[str, float]  # sparsity reached, parameters, MACs, speed
    model: nn.Module | None = None  # on the CPU, only when the cell logs its model
    speed_of: str = "this cell"  # whose timing the speed measures are: this cell's or its source's


class SourceCells:
    """The cells of one source model on one device. The dense weights are copied to the device
    once; unstructured cells load them in place into one working model and prune it (so a
    compiled forward pass serves them all without recompiling); the dense model (sparsity 0,
    the same for every method) is evaluated once. Structured cells change shapes: each prunes
    its own copy, with the channel ratio found once per architecture and sparsity."""

    def __init__(
        self,
        source: ModelSource,
        test: DeviceImages,
        runtime: Runtime,
        settings: CellSettings,
        finetune: Finetune,
    ):
        self.source, self.test, self.runtime = source, test, runtime
        self.settings, self.finetune = settings, finetune
        size = source.data.image_size
        self.example = torch.zeros(1, 3, size, size, device=runtime.device)
        self.working = runtime.place_model(copy.deepcopy(source.model)).eval()
        # In the runtime's layout: loading it back is a plain copy, never a layout change.
        self.dense = {k: v.detach().clone() for k, v in self.working.state_dict().items()}
        self.total, _ = count_prunable(self.working)
        self.forward = runtime.compiled(self.working)
        self.dense_result: CellResult | None = None
        # An unstructured cell runs the dense kernels whatever its sparsity: timed once.
        self.unstructured_speed: dict[str, float] | None = None

    def compute(self, method: str, sparsity: float) -> CellResult:
        """The cell's result; `cell_images_per_s` counts everything from the dense weights to
        the measured pruned model (for sparsity 0, its one computation)."""
        started = time.perf_counter()
        if sparsity == 0 and not self.finetune.epochs:
            if self.dense_result is None:
                self.dense_result = self._evaluate(self._load_dense(), self.forward)
                self._count_rate(self.dense_result, started)
            return self.dense_result
        result = self._compute_pruned(method, sparsity)
        self._count_rate(result, started)
        return result

    def _count_rate(self, result: CellResult, started: float) -> None:
        self.runtime.synchronize()
        result.measures["cell_images_per_s"] = len(self.test) / (time.perf_counter() - started)

    def _compute_pruned(self, method: str, sparsity: float) -> CellResult:
        if method == "structured":
            model = copy.deepcopy(self.source.model).to(self.runtime.device).eval()
            model = prune_model(model, method, sparsity, example_inputs=self.example)
            model, forward = self.runtime.place_model(model), None
        else:
            model, forward = self._load_dense(), self.forward
            prune_model(model, method, sparsity, example_inputs=self.example, seed=self.source.seed)
            self.runtime.place_model(model)  # pruned in the standard layout (a no-op if it is)
        if self.finetune.epochs:
            _finetune(model, self.source, self.finetune, self.runtime)
        return self._evaluate(model, forward)

    def _load_dense(self) -> nn.Module:
        self.working.load_state_dict(self.dense)  # copies in place, in the same layout
        return self.working

    def _evaluate(self, model: nn.Module, forward: nn.Module | None) -> CellResult:
        logits, batch_seconds = device_logits(
            model,
            self.test,
            runtime=self.runtime,
            batch_size=self.settings.batch_size,
            forward=forward,
        )
        _, nonzero = count_prunable(model)
        measures = {
            "achieved_sparsity": 1 - nonzero / self.total,
            "nonzero_params": nonzero_parameters(model),
            "macs": count_macs(model, self.example),
            **self._speed(model, forward, batch_seconds),
        }
        kept = portable_model(copy.deepcopy(model)) if self.settings.log_model else None
        speed_of = "source (dense kernels)" if model is self.working else "this cell"
        return CellResult(sigmoid(logits.numpy()), measures, kept, speed_of)

    def _speed(self, model: nn.Module, forward, batch_seconds: list[float]) -> dict[str, float]:
        """The plain model's speed (structured models are not compiled), so the evaluation's
        timings count only where they were of the plain model; an unstructured cell's is the
        source's, measured by the first of them."""
        unstructured = model is self.working
        if unstructured and self.unstructured_speed is not None:
            return self.unstructured_speed
        timed = batch_seconds if forward is None or forward is model else []
        speed = measure_speed(model, self.test, self.runtime, self.settings.batch_size, timed)
        if unstructured:
            self.unstructured_speed = speed
        return speed


def measure_speed(
    forward: nn.Module,
    test: DeviceImages,
    runtime: Runtime,
    batch_size: int,
    batch_seconds: list[float],
) -> dict[str, float]:
    """Model-only speed (inputs already on the device and normalized; no host copies): the
    median of TIMED_REPEATS timed passes after a warm-up, at batch 1 and at the sweep's batch
    size (the evaluation's own full batches count as repetitions). CUDA events on a GPU."""
    size = min(batch_size, len(test))
    single = _time_passes(forward, test, 1, runtime, [])
    at_batch = _time_passes(forward, test, size, runtime, batch_seconds)
    return {
        "latency_ms_batch1": 1000 * single,
        "latency_ms_per_image": 1000 * at_batch / size,
        "throughput_images_per_s": size / at_batch,
    }


def _time_passes(forward, test: DeviceImages, size: int, runtime, timed: list[float]) -> float:
    batch = runtime.place_batch(normalize(test.slice(0, size).unsqueeze(1)))
    timed = list(timed)
    with torch.inference_mode(), runtime.autocast():
        if not timed:  # warm-up (the evaluation pass warmed up the sweep's batch size)
            for _ in range(WARMUP_PASSES):
                forward(batch)
        while len(timed) < TIMED_REPEATS:
            watch = Stopwatch(runtime)
            forward(batch)
            timed.append(watch.stop().seconds())
    return float(np.median(timed))
