"""Dense kernel choices on disk: what ``tune`` measured and verified per layer, and the choice ``compile`` applies.

The dense kernels (GEMM, direct, Winograd) are scheduled TIR written by the Relax passes, with
their weights packed for one register tile: meta_schedule cannot tune them, but which kernel and
tile a layer runs on can be measured. ``tune`` builds every candidate of each dense layer
(:meth:`~tvm_patdnn.transform.winograd_conv_rewrite.WinogradConvRewriter.candidates`, the rules'
choice first) and times it once like any trial (same builder and runner, so also over RPC), then
verifies the fastest few against the rules' choice as it verifies a task's records (the tuner's
``_verify_layers``): one measurement each overstated (session 12: VGG-16 CIFAR's first conv
printed 1.56x, 1.07x in process). ``compile`` runs each layer on its verdict's choice
(:func:`load_kernel_choices`).

``dense_kernels.json`` in the database directory holds one JSON line per measured candidate
(target key, thread count, layer, choice, ms or the error) and one per verdict (the same keys, the
applied choice and its median ms, plus ``verdict``: :class:`DenseVerdict`), appended under the
directory's lock like the meta_schedule records: a killed tune leaves at most a torn last line,
which readers skip and the next writer cuts; a re-run measures only the candidates not on record
at its thread count and verifies only layers whose measurements changed since their verdict.
``compile`` takes each layer's choice from its own thread count's lines, else those that do not
say theirs (lines written before the count was recorded), never another count's
(``threads.preference``, as for the records).

A layer with a verdict runs its latest verdict's choice (the rules' choice at tune time when the
default was kept, as a task's "default kept" verdict replays the default's trace), never a faster
single measurement. A layer measured but not verified (databases of session 12 and
earlier, a tune stopped between the measurements and the verification) runs its fastest
measurement, as unverified records do, with a warning: re-running the same ``patdnn tune`` verifies
it without measuring anything again.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
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
from ..transform.kernel_choice import KernelChoice, KernelChoices, KernelSpec, kernel_function, layer_key, layer_spec
from ..transform.winograd_conv_rewrite import WinogradConvRewriter
from .database import KERNEL_CHOICES, directory_lock, read_json_lines, target_key
from .measure import mean_ms, short_error
from .tasks import normalize
from .threads import not_applied, preference, thread_count

__all__ = ["DenseVerdict", "LayerResult", "commit_verdict", "describe_layer", "load_kernel_choices",
           "measure_candidate", "recorded_layers", "to_verify", "tune_dense_kernels"]


@dataclass(frozen=True)
class DenseVerdict:
    """The tuner's verdict on a dense layer: its best candidate re-measured against the rules'
    choice (``default``), alternately, in rounds (ms per round). ``choice`` is what ``compile``
    applies: ``candidate`` when ``kept``, else ``default``. ``measured``: the layer's candidates
    on record when verified (a tune that measures more verifies again)."""

    default: KernelChoice
    candidate: KernelChoice
    kept: bool
    speedup: float  # default / candidate over the rounds (the tuner's ``_verified_speedup``)
    default_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]
    measured: int

    @property
    def choice(self) -> KernelChoice:
        return self.candidate if self.kept else self.default

    def as_json(self) -> dict:
        return {"kept": self.kept, "speedup": self.speedup, "default": self.default.as_json(),
                "candidate": self.candidate.as_json(), "default_ms": list(self.default_ms),
                "candidate_ms": list(self.candidate_ms), "measured": self.measured}

    @staticmethod
    def from_json(entry: dict, layer: DenseConvSpec) -> DenseVerdict:
        return DenseVerdict(KernelChoice.from_json(entry["default"], layer),
                            KernelChoice.from_json(entry["candidate"], layer), bool(entry["kept"]),
                            float(entry["speedup"]), tuple(map(float, entry["default_ms"])),
                            tuple(map(float, entry["candidate_ms"])), int(entry["measured"]))


@dataclass
class LayerResult:
    """How one dense layer stands: candidates on record, the default's and the best time (ms) as
    measured once each, and its verdict at the tune's thread count, if any."""

    name: str
    layer: DenseConvSpec
    measured: int
    default_ms: float | None
    best_ms: float | None
    failed: int = 0  # candidates of this tune that failed
    error: str | None = None
    verdict: DenseVerdict | None = None


def describe_layer(layer: DenseConvSpec) -> str:
    """``conv 3x3 64->128 56x56 s2``: how the tables name a dense layer."""
    kernel = "x".join(map(str, layer.kernel))
    stride = f" s{layer.strides[0]}" if layer.strides != (1, 1) else ""
    batch = f" batch {layer.batch}" if layer.batch != 1 else ""
    return f"conv {kernel} {layer.in_channels}->{layer.out_channels} {layer.height}x{layer.width}{stride}{batch}"


def _entries(path: Path, key: str) -> list[dict]:
    """The lines of the device ``key`` in ``path`` (a missing file: none)."""
    found = []
    for number, entry in read_json_lines(path):
        if not isinstance(entry, dict) or not {"target", "layer", "choice", "ms"} <= set(entry):
            raise PatDNNError(f"{path}:{number} is not a dense kernel record")
        if entry["target"] == key:
            found.append(entry)
    return found


_Measured = dict[int | None, dict[str, dict[KernelChoice, float | None]]]
_Verdicts = dict[int | None, dict[str, DenseVerdict]]


def _read(path: Path, key: str) -> tuple[_Measured, _Verdicts]:
    """(thread count (None: not recorded) -> layer key -> {choice: ms, None for a failed candidate},
    thread count -> layer key -> its latest verdict)."""
    measured: _Measured = {}
    verdicts: _Verdicts = {}
    for entry in _entries(path, key):
        try:
            layer = layer_spec(entry["layer"])
            choice = KernelChoice.from_json(entry["choice"], layer)
            verdict = DenseVerdict.from_json(entry["verdict"], layer) if "verdict" in entry else None
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a kernel of another version: not applied, not counted
        name = json.dumps(entry["layer"], sort_keys=True)
        if verdict is not None:
            verdicts.setdefault(entry.get("threads"), {})[name] = verdict
        else:
            measured.setdefault(entry.get("threads"), {}).setdefault(name, {})[choice] = entry["ms"]
    return measured, verdicts


def _default_choice(layer: str, rewriter: WinogradConvRewriter) -> KernelChoice:
    """The rules' choice for a layer key."""
    return KernelChoice.of(rewriter.candidates(layer_spec(json.loads(layer)))[0])


def load_kernel_choices(database: str | os.PathLike, target: Target) -> tuple[KernelChoices, dict[str, int | None]]:
    """The choice per layer for ``target``'s device and thread count (none if never tuned): its
    latest verdict's (the rules' choice at tune time when the default was kept), else its fastest
    measurement (with a warning when that is not the rules' choice: unverified); and the thread
    count each layer's choice was measured at; a layer measured only at other counts, whose
    measurements are not applied, maps to the nearest of them."""
    measured, verdicts = _read(Path(database) / KERNEL_CHOICES, target_key(target))
    counts = {*measured, *verdicts}
    threads = thread_count(target)
    best: dict[str, KernelChoice] = {}
    measured_at: dict[str, int | None] = {}
    unverified = []
    rewriter = WinogradConvRewriter(vector_registers(target), vector_lanes(target))
    for count in preference(counts, threads):
        for layer, verdict in verdicts.get(count, {}).items():
            if layer not in measured_at:
                best[layer], measured_at[layer] = verdict.choice, count
        for layer, times in measured.get(count, {}).items():
            timed = [(ms_, choice) for choice, ms_ in times.items() if ms_ is not None]
            if timed and layer not in measured_at:
                best[layer] = min(timed, key=lambda item: item[0])[1]
                measured_at[layer] = count
                if best[layer] != _default_choice(layer, rewriter):
                    unverified.append(layer)
    for count in not_applied(counts, threads):
        for layer in {*measured.get(count, {}), *verdicts.get(count, {})}:
            measured_at.setdefault(layer, count)
    if unverified:
        warnings.warn(f"{len(unverified)} dense layer(s) in {database} run a kernel choice measured once, not "
                      "verified against the rules' choice (a tune of session 12 or earlier, or one stopped before "
                      "its verification): re-run the same `patdnn tune` to verify them", UserWarning, stacklevel=2)
    return KernelChoices(best), measured_at


@dataclass(frozen=True)
class ToVerify:
    """A dense layer's candidates for verification: ``specs``, the rules' choice first, then the
    fastest measured others; ``search_claim``, what the single measurements said (default / fastest);
    ``measured``, the candidates on record."""

    specs: list[KernelSpec]
    search_claim: float
    measured: int

    def verdict(self, best: int, kept: bool, speedup: float, default_ms: tuple[float, ...],
                candidate_ms: tuple[float, ...]) -> DenseVerdict:
        """The verdict when ``specs[best]`` was the best candidate."""
        return DenseVerdict(KernelChoice.of(self.specs[0]), KernelChoice.of(self.specs[best]), kept, speedup,
                            default_ms, candidate_ms, self.measured)


def to_verify(layer: DenseConvSpec, target: Target, database: Path, candidates: int) -> ToVerify | None:
    """What to verify of ``layer`` at ``target``'s thread count: the rules' choice and the
    ``candidates`` fastest other timed candidates; None when the rules' choice is not timed or is
    the fastest (it applies anyway), or the layer's latest verdict covers every candidate on record."""
    key, threads = target_key(target), thread_count(target)
    measured, verdicts = _read(database / KERNEL_CHOICES, key)
    times = measured.get(threads, {}).get(layer_key(layer), {})
    previous = verdicts.get(threads, {}).get(layer_key(layer))
    if previous is not None and previous.measured == len(times):
        return None
    specs = {KernelChoice.of(spec): spec for spec in
             WinogradConvRewriter(vector_registers(target), vector_lanes(target)).candidates(layer)}
    default = next(iter(specs))
    timed = sorted(((t, choice) for choice, t in times.items() if t is not None and choice in specs),
                   key=lambda item: item[0])
    if not timed or timed[0][1] == default or times.get(default) is None:
        return None
    others = [specs[choice] for _t, choice in timed if choice != default][:candidates]
    return ToVerify([specs[default], *others], times[default] / timed[0][0], len(times))


def commit_verdict(database: Path, target: Target, layer: DenseConvSpec, verdict: DenseVerdict) -> None:
    """Append the layer's verdict: from now on ``compile`` runs it on ``verdict.choice``."""
    threads = thread_count(target)
    _append(database, [{"target": target_key(target), **({"threads": threads} if threads is not None else {}),
                        "layer": json.loads(layer_key(layer)), "choice": verdict.choice.as_json(),
                        "ms": statistics.median(verdict.candidate_ms if verdict.kept else verdict.default_ms),
                        "verdict": verdict.as_json()}])


def measure_candidate(spec: KernelSpec) -> ms.search_strategy.MeasureCandidate:
    """A candidate kernel as the tuner's builder and runner take it."""
    func, _name = kernel_function(spec)
    return ms.search_strategy.MeasureCandidate(s_tir.Schedule(normalize(func)),
                                               ms.arg_info.ArgInfo.from_prim_func(func))


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


def recorded_layers(layers: list[DenseConvSpec], target: Target, database: Path,
                    failures: dict[str, tuple[int, str | None]] | None = None) -> list[LayerResult]:
    """How each layer stands in ``database`` at ``target``'s thread count, as the tune's results
    say it; ``failures``: layer key -> (candidates that failed in this tune, the last error)."""
    rewriter = WinogradConvRewriter(vector_registers(target), vector_lanes(target))
    measured, verdicts = _read(database / KERNEL_CHOICES, target_key(target))
    threads = thread_count(target)
    results = []
    for layer in layers:
        key = layer_key(layer)
        times = measured.get(threads, {}).get(key, {})
        timed = [t for t in times.values() if t is not None]
        failed, error = (failures or {}).get(key, (0, None))
        results.append(LayerResult(describe_layer(layer), layer, len(times),
                                   times.get(KernelChoice.of(rewriter.candidates(layer)[0])),
                                   min(timed, default=None), failed, error, verdicts.get(threads, {}).get(key)))
    return results


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
    on_record = _read(database / KERNEL_CHOICES, key)[0].get(threads, {})
    plan = []
    for layer in layers:
        done = on_record.get(layer_key(layer), {})
        plan.append((layer, [c for c in rewriter.candidates(layer) if KernelChoice.of(c) not in done]))
    todo = sum(len(missing) for _, missing in plan)
    if progress is not None and todo:
        print(f"measuring {todo} dense kernel candidate(s) of {sum(bool(m) for _, m in plan)} layer(s)",
              file=progress, flush=True)
    failures: dict[str, tuple[int, str | None]] = {}
    stopped = None
    for layer, missing in plan:
        if not missing or stopped is not None:
            continue
        outcomes = measure([measure_candidate(spec) for spec in missing])
        stopped = unavailable(outcomes)
        entries, failed, error = [], 0, None
        for spec, result in zip(missing, outcomes):
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
        if entries:
            _append(database, entries)
        failures[layer_key(layer)] = (failed, error)
        (result,) = recorded_layers([layer], target, database)
        if progress is not None and result.best_ms is not None:
            print(f"  {result.name}: default {_fmt(result.default_ms)} ms, best {result.best_ms:.4g} ms",
                  file=progress, flush=True)
    return recorded_layers(layers, target, database, failures), stopped


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
