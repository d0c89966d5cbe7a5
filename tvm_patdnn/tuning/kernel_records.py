"""Dense kernel choices on disk: what ``tune`` measured per dense layer, and the fastest for ``compile``.

The dense kernels (GEMM, direct, Winograd) are scheduled TIR written by the Relax passes, with
their weights packed for one register tile: meta_schedule cannot tune them, but which kernel and
tile a layer runs on can be measured. ``tune`` builds every candidate of each dense layer
(:meth:`~tvm_patdnn.transform.winograd_conv_rewrite.WinogradConvRewriter.candidates`, the rules'
choice first) and times it like any trial (same builder and runner, so also over RPC); ``compile``
runs each layer on its fastest (:func:`load_kernel_choices`).

``dense_kernels.json`` in the database directory holds one JSON line per measured candidate
(target key, thread count, layer, choice, ms or the error), appended under the directory's lock
like the meta_schedule records: a killed tune leaves at most a torn last line, which readers skip
and the next writer cuts; a re-run measures only the candidates not on record at its thread
count. ``compile`` takes each layer's choice from its own thread count's measurements, else those
that do not say theirs (lines written before the count was recorded), never another count's
(``threads.preference``, as for the records).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import PatDNNError
from ..ops.dense_conv import DenseConvSpec
from ..targets import vector_lanes, vector_registers
from ..transform.kernel_choice import KernelChoice, KernelChoices, kernel_function, layer_key, layer_spec
from ..transform.winograd_conv_rewrite import WinogradConvRewriter
from .database import KERNEL_CHOICES, directory_lock, read_json_lines, target_key
from .measure import mean_ms, short_error
from .tasks import normalize
from .threads import not_applied, preference, thread_count

__all__ = ["LayerResult", "describe_layer", "load_kernel_choices", "tune_dense_kernels"]


@dataclass
class LayerResult:
    """How one dense layer stands: candidates on record, the default's and the best time (ms)."""

    name: str
    measured: int
    default_ms: float | None
    best_ms: float | None
    failed: int = 0  # candidates of this tune that failed
    error: str | None = None


def describe_layer(layer: DenseConvSpec) -> str:
    """``conv 3x3 64->128 56x56 s2``: how the tables name a dense layer."""
    kernel = "x".join(map(str, layer.kernel))
    stride = f" s{layer.strides[0]}" if layer.strides != (1, 1) else ""
    batch = f" batch {layer.batch}" if layer.batch != 1 else ""
    return f"conv {kernel} {layer.in_channels}->{layer.out_channels} {layer.height}x{layer.width}{stride}{batch}"


def _entries(path: Path, key: str) -> list[dict]:
    """The records of the device ``key`` in ``path`` (a missing file: none)."""
    found = []
    for number, entry in read_json_lines(path):
        if not isinstance(entry, dict) or not {"target", "layer", "choice", "ms"} <= set(entry):
            raise PatDNNError(f"{path}:{number} is not a dense kernel record")
        if entry["target"] == key:
            found.append(entry)
    return found


def _measured(path: Path, key: str) -> dict[int | None, dict[str, dict[KernelChoice, float | None]]]:
    """thread count (None: not recorded) -> layer key -> {choice: ms, None for a failed candidate}."""
    table: dict[int | None, dict[str, dict[KernelChoice, float | None]]] = {}
    for entry in _entries(path, key):
        try:
            choice = KernelChoice.from_json(entry["choice"], layer_spec(entry["layer"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a kernel of another version: not applied, not counted
        layers = table.setdefault(entry.get("threads"), {})
        layers.setdefault(json.dumps(entry["layer"], sort_keys=True), {})[choice] = entry["ms"]
    return table


def load_kernel_choices(database: str | os.PathLike, target: Target) -> tuple[KernelChoices, dict[str, int | None]]:
    """The fastest measured candidate per layer for ``target``'s device and thread count (none if
    never tuned), and the thread count each layer's choice was measured at; a layer measured only
    at other counts, whose measurements are not applied, maps to the nearest of them."""
    by_threads = _measured(Path(database) / KERNEL_CHOICES, target_key(target))
    threads = thread_count(target)
    best: dict[str, KernelChoice] = {}
    measured_at: dict[str, int | None] = {}
    for count in preference(by_threads, threads):
        for layer, times in by_threads[count].items():
            timed = [(ms_, choice) for choice, ms_ in times.items() if ms_ is not None]
            if timed and layer not in best:
                best[layer] = min(timed, key=lambda item: item[0])[1]
                measured_at[layer] = count
    for count in not_applied(by_threads, threads):
        for layer in by_threads[count]:
            measured_at.setdefault(layer, count)
    return KernelChoices(best), measured_at


def _append(database: Path, entries: list[dict]) -> None:
    """Append whole lines under the directory lock, first cutting a torn line a killed writer left."""
    path = database / KERNEL_CHOICES
    data = b"".join((json.dumps(e, separators=(",", ":")) + "\n").encode() for e in entries)
    with directory_lock(database):
        if path.is_file():
            with open(path, "rb+") as handle:
                text = handle.read()
                if text and not text.endswith(b"\n"):
                    handle.truncate(text.rfind(b"\n") + 1)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def tune_dense_kernels(
    layers: list[DenseConvSpec],
    target: Target,
    database: Path,
    measure: Callable[[list[ms.search_strategy.MeasureCandidate]], list[ms.runner.RunnerResult]],
    progress: TextIO | None = None,
    unavailable: Callable[[list[ms.runner.RunnerResult]], str | None] = lambda _results: None,
) -> tuple[list[LayerResult], str | None]:
    """Measure every candidate of every layer not on record yet; (results per layer, why the
    measurements stopped early or None). ``measure`` builds and runs a batch (the tuner's);
    ``unavailable`` says from its results that the device is gone, which stops here too."""
    rewriter = WinogradConvRewriter(vector_registers(target), vector_lanes(target))
    key, threads = target_key(target), thread_count(target)
    # updated in memory as candidates are measured
    on_record = _measured(database / KERNEL_CHOICES, key).get(threads, {})
    plan = []
    for layer in layers:
        candidates = rewriter.candidates(layer)
        done = on_record.get(layer_key(layer), {})
        plan.append((layer, candidates, [c for c in candidates if KernelChoice.of(c) not in done]))
    todo = sum(len(missing) for *_, missing in plan)
    if progress is not None and todo:
        print(f"measuring {todo} dense kernel candidate(s) of {sum(bool(m) for *_, m in plan)} layer(s)",
              file=progress, flush=True)
    results, stopped = [], None
    for layer, candidates, missing in plan:
        failed, error = 0, None
        times = on_record.setdefault(layer_key(layer), {})
        if missing and stopped is None:
            batch = []
            for spec in missing:
                func, _name = kernel_function(spec)
                batch.append(ms.search_strategy.MeasureCandidate(s_tir.Schedule(normalize(func)),
                                                                 ms.arg_info.ArgInfo.from_prim_func(func)))
            measured = measure(batch)
            stopped = unavailable(measured)
            entries = []
            for spec, result in zip(missing, measured):
                if stopped is not None and result.error_msg is not None:
                    continue  # never reached the device: measure again next time
                time = mean_ms(result.run_secs) if result.error_msg is None else None
                if time is None:
                    failed += 1
                    error = short_error(result.error_msg)
                entries.append({"target": key, **({"threads": threads} if threads is not None else {}),
                                "layer": json.loads(layer_key(layer)),
                                "choice": KernelChoice.of(spec).as_json(), "ms": time,
                                **({"error": error} if time is None else {})})
                times[KernelChoice.of(spec)] = time
            if entries:
                _append(database, entries)
        timed = {choice: t for choice, t in times.items() if t is not None}
        best = min(timed, key=timed.get, default=None)
        results.append(LayerResult(describe_layer(layer), len(times), times.get(KernelChoice.of(candidates[0])),
                                   timed.get(best), failed, error))
        if progress is not None and missing and best is not None:
            print(f"  {describe_layer(layer)}: default {_fmt(results[-1].default_ms)} ms, best {timed[best]:.4g} ms "
                  f"({best})", file=progress, flush=True)
    return results, stopped


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
