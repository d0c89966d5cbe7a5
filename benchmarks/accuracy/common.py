"""Shared driver of the accuracy experiments: dense vs one-shot vs magnitude vs ADMM.

Each experiment script supplies a dense model (pretrained or trained here, :func:`train_dense`)
and its data; this module runs, for every connectivity rate and seed:

* ``oneshot``   – project the dense weights onto both constraints, no retraining;
* ``magnitude`` – the same projection, then masked fine-tuning for the whole epoch budget;
* ``admm``      – extended ADMM for ``admm_epochs``, hard pruning, masked retraining for
  ``retrain_epochs`` (same total budget as ``magnitude``).

Results are appended to a JSON file after every run (written atomically), so an
interrupted experiment resumes where it stopped; the markdown table and the plots are
regenerated from that JSON at the end.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.kernel_patterns import format_pattern
from tvm_patdnn.pruning.admm import PatternADMMPruner, magnitude_prune
from tvm_patdnn.pruning.checkpoint import load_checkpoint, save_checkpoint
from tvm_patdnn.pruning.onnx_export import export_pruned_onnx
from tvm_patdnn.pruning.plots import plot_pattern_frequencies
from tvm_patdnn.pruning.projection import parse_block, pattern_frequencies
from tvm_patdnn.pruning.sparsifier import default_config

from .training import evaluate, train_epoch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Connectivity rates of the one-shot sweep in the accuracy-vs-rate plot (no retraining, cheap).
ONESHOT_SWEEP = (1.0, 1.5, 2.0, 2.5, 3.0, 3.6, 4.5, 6.0, 8.0)


@dataclass
class Budget:
    """Training budget and ADMM hyperparameters shared by the two retraining methods."""

    admm_epochs: int
    retrain_epochs: int
    batch_size: int = 128
    lr_admm: float = 0.01
    lr_retrain: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rounds_per_epoch: int = 4
    rho: float = 1e-2
    rho_growth: float = 2.0
    rho_max: float = 1.0
    n_patterns: int = 8
    pointwise: float | None = None  # keep rate of the 1x1 convs (None: they stay dense)
    pointwise_block: tuple[int, int] = (4, 1)
    bn_recal_images: int = 0  # after hard pruning, re-estimate BatchNorm statistics on this many images

    @property
    def total_epochs(self) -> int:
        return self.admm_epochs + self.retrain_epochs


def add_common_args(parser: argparse.ArgumentParser, *, admm_epochs: int, retrain_epochs: int, seeds: list[int],
                    pointwise: float | None = None) -> None:
    parser.add_argument("--admm-epochs", type=int, default=admm_epochs)
    parser.add_argument("--retrain-epochs", type=int, default=retrain_epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--rates", type=float, nargs="+", default=[3.6],
                        help="connectivity rates for the retraining methods (3.6 = 8x with 4-entry patterns)")
    parser.add_argument("--methods", nargs="+", choices=("oneshot", "magnitude", "admm"),
                        default=["oneshot", "magnitude", "admm"], help="which pruning methods to run")
    parser.add_argument("--rho", type=float, default=1e-2)
    parser.add_argument("--rho-growth", type=float, default=2.0)
    parser.add_argument("--rho-max", type=float, default=1.0)
    parser.add_argument("--rounds-per-epoch", type=int, default=4)
    parser.add_argument("--pointwise", type=float, default=pointwise,
                        help="keep rate of the 1x1 convs (default: %(default)s; unset leaves them dense)")
    parser.add_argument("--pointwise-block", type=parse_block, default=(4, 1), metavar="OxI",
                        help="granularity of 1x1 pruning, output x input channels (default 4x1)")
    parser.add_argument("--bn-recal", type=int, default=0, metavar="IMAGES",
                        help="after hard pruning, re-estimate BatchNorm running statistics on this many "
                             "training images before retraining (0: off)")
    parser.add_argument("--name", help="results file stem (default: the experiment's name)")
    parser.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tvm_patdnn_accuracy"),
                        help="dense checkpoints and pruned ONNX models (not committed)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier, interrupted run")
    parser.add_argument("--progress", action="store_true", default=None, help="force tqdm bars (default: only on a TTY)")


def budget_from_args(args: argparse.Namespace, **overrides: Any) -> Budget:
    return Budget(admm_epochs=args.admm_epochs, retrain_epochs=args.retrain_epochs, rho=args.rho,
                  rho_growth=args.rho_growth, rho_max=args.rho_max, rounds_per_epoch=args.rounds_per_epoch,
                  pointwise=args.pointwise, pointwise_block=args.pointwise_block, bn_recal_images=args.bn_recal,
                  **overrides)


def module_command(command: str) -> str:
    """The command that reruns a recorded ``<script>.py <options>`` (what results files store)."""
    script, _, options = command.partition(" ")
    return " ".join(filter(None, ["python -m", f"benchmarks.accuracy.{Path(script).stem}", options]))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _sgd(model: nn.Module, lr: float, budget: Budget) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=budget.momentum, weight_decay=budget.weight_decay)


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))


def conv_compression(model: nn.Module) -> float:
    """Dense / nonzero weights over all conv layers (the first, dense conv included)."""
    total = nonzero = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel()
            nonzero += int((m.weight != 0).sum())
    return total / max(nonzero, 1)


def _pruned_compression(report: list[dict[str, Any]], kind: str | None = None) -> float:
    """Dense / nonzero weights over the pruned layers (of one ``kind`` of the report, or all)."""
    rows = [r for r in report if kind is None or r["kind"] == kind]
    return sum(r["weights"] for r in rows) / max(sum(r["nonzeros"] for r in rows), 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, images: int, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``images`` training images.

    Hard pruning shifts each pruned layer's output statistics, while the running estimates
    still describe the dense layer; recomputing them (a cumulative average, no gradient step)
    removes that mismatch before retraining starts.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the recalibration batches
    was_training = model.training
    model.train()
    for start in range(0, min(images, len(x)), batch_size):
        model(x[start:min(start + batch_size, images)])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def run_oneshot(model: nn.Module, config: list[dict[str, Any]], budget: Budget, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    pruner = magnitude_prune(model, config, n_patterns=budget.n_patterns)
    pruner.squash_mask()
    pruner.verify()
    return _summary(model, pruner, data, epochs=0)


def run_magnitude(model: nn.Module, config: list[dict[str, Any]], budget: Budget, data: dict[str, torch.Tensor],
                  seed: int, progress: bool | None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = _sgd(model, budget.lr_retrain, budget)
    pruner = magnitude_prune(model, config, n_patterns=budget.n_patterns, optimizer=optimizer)
    recalibrate_bn(model, data["xtr"], budget.bn_recal_images)
    steps = budget.total_epochs * math.ceil(len(data["xtr"]) / budget.batch_size)
    scheduler = _cosine(optimizer, steps)
    history = []
    for epoch in range(budget.total_epochs):
        loss = train_epoch(model, data["xtr"], data["ytr"], optimizer, batch_size=budget.batch_size,
                           generator=generator, scheduler=scheduler, progress=progress, desc=f"magnitude ep{epoch}")
        history.append({"epoch": epoch, "loss": loss, "test_acc": evaluate(model, data["xte"], data["yte"])})
        log(f"  magnitude epoch {epoch}: loss {loss:.4f} acc {history[-1]['test_acc']:.4f}")
    pruner.squash_mask()
    pruner.verify()
    return _summary(model, pruner, data, epochs=budget.total_epochs, history=history)


def run_admm(model: nn.Module, config: list[dict[str, Any]], budget: Budget, data: dict[str, torch.Tensor],
             seed: int, progress: bool | None, onnx_path: Path | None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(len(data["xtr"]) / budget.batch_size)
    pruner = PatternADMMPruner(budget.n_patterns, rho=budget.rho, rho_growth=budget.rho_growth,
                               rho_max=budget.rho_max,
                               admm_interval=max(1, batches_per_epoch // budget.rounds_per_epoch))
    pruner.prepare(model, config)
    optimizer = _sgd(model, budget.lr_admm, budget)
    history = []
    for epoch in range(budget.admm_epochs):
        loss = train_epoch(model, data["xtr"], data["ytr"], optimizer, pruner=pruner, batch_size=budget.batch_size,
                           generator=generator, progress=progress, desc=f"admm ep{epoch}")
        res = pruner.residuals()
        worst = max(max(r.values()) for r in res.values())
        history.append({"epoch": epoch, "phase": "admm", "loss": loss, "rho": pruner.rho, "max_residual": worst,
                        "test_acc": evaluate(model, data["xte"], data["yte"])})
        log(f"  admm epoch {epoch}: loss {loss:.4f} rho {pruner.rho:.3g} max residual {worst:.3f} "
            f"acc(unpruned) {history[-1]['test_acc']:.4f}")
    retrain = _sgd(model, budget.lr_retrain, budget)
    pruner.hard_prune(retrain)
    hard_acc = evaluate(model, data["xte"], data["yte"])
    log(f"  admm hard-pruned (no retraining yet): acc {hard_acc:.4f}")
    recal_acc = None
    if budget.bn_recal_images:
        recalibrate_bn(model, data["xtr"], budget.bn_recal_images)
        recal_acc = evaluate(model, data["xte"], data["yte"])
        log(f"  BatchNorm recalibrated on {budget.bn_recal_images} images: acc {recal_acc:.4f}")
    scheduler = _cosine(retrain, budget.retrain_epochs * batches_per_epoch)
    for epoch in range(budget.retrain_epochs):
        loss = train_epoch(model, data["xtr"], data["ytr"], retrain, batch_size=budget.batch_size,
                           generator=generator, scheduler=scheduler, progress=progress, desc=f"retrain ep{epoch}")
        history.append({"epoch": budget.admm_epochs + epoch, "phase": "retrain", "loss": loss,
                        "test_acc": evaluate(model, data["xte"], data["yte"])})
        log(f"  retrain epoch {epoch}: loss {loss:.4f} acc {history[-1]['test_acc']:.4f}")
    pruner.squash_mask()
    pruner.verify()
    summary = _summary(model, pruner, data, epochs=budget.total_epochs, history=history)
    summary["acc_after_hard_prune"] = hard_acc
    if recal_acc is not None:
        summary["acc_after_bn_recal"] = recal_acc
    if onnx_path is not None:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_pruned_onnx(model, data["xte"][:1], onnx_path)
        summary["onnx"] = str(onnx_path)
    return summary


def _summary(model: nn.Module, pruner: PatternADMMPruner, data: dict[str, torch.Tensor], *, epochs: int,
             history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    report = pruner.report()
    return {
        "test_acc": evaluate(model, data["xte"], data["yte"]),
        "epochs": epochs,
        "patterns": pruner.patterns,
        "pruned_layer_compression": _pruned_compression(report),
        "compression_by_kind": {kind: _pruned_compression(report, kind) for kind in sorted({r["kind"] for r in report})},
        "conv_compression": conv_compression(model),
        "layers": report,
        "history": history or [],
    }


def run_experiment(
    *,
    name: str,
    title: str,
    args: argparse.Namespace,
    budget: Budget,
    data: dict[str, torch.Tensor],
    dense_model: Callable[[int], nn.Module],
    extra_meta: dict[str, Any],
) -> dict[str, Any]:
    """Run every (method, rate, seed) not yet in ``results/<name>.json``, then table + plots."""
    torch.set_num_threads(args.threads)
    name = args.name or name
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / f"{name}.json"
    state: dict[str, Any] = {"runs": []}
    if json_path.exists() and not args.fresh:
        state = json.loads(json_path.read_text())
        log(f"resuming: {len(state['runs'])} runs already in {json_path}")
    state["meta"] = {
        "experiment": name, "title": title, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "budget": asdict(budget), "seeds": args.seeds, "rates": args.rates, "threads": args.threads,
        "train_images": len(data["xtr"]), "test_images": len(data["xte"]),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        **extra_meta,
    }
    done = {(r["method"], r["rate"], r["seed"]) for r in state["runs"]}

    def record(run: dict[str, Any]) -> None:
        state["runs"].append(run)
        write_json_atomic(json_path, state)

    for seed in args.seeds:
        t0 = time.time()
        dense = dense_model(seed)
        dense_time = time.time() - t0
        dense_state = copy.deepcopy(dense.state_dict())
        config = default_config(dense, pointwise=budget.pointwise, block=budget.pointwise_block)
        if ("dense", None, seed) not in done:
            record({"method": "dense", "rate": None, "seed": seed, "test_acc": evaluate(dense, data["xte"], data["yte"]),
                    "conv_compression": conv_compression(dense), "pruned_layer_compression": 1.0,
                    "wall_s": dense_time, "epochs": extra_meta.get("dense_epochs", 0)})
            log(f"seed {seed}: dense acc {state['runs'][-1]['test_acc']:.4f}")
        if seed == args.seeds[0] and "pattern_frequencies" not in state:
            weights = [dense.get_parameter(c["tensor_fqn"]).detach().numpy() for c in config if "connectivity" in c]
            freqs = pattern_frequencies(weights)
            patterns = PatternADMMPruner(budget.n_patterns).prepare(copy.deepcopy(dense), config).patterns
            state["pattern_frequencies"] = {str(k): v for k, v in freqs.items()}
            state["selected_patterns"] = patterns
            write_json_atomic(json_path, state)
        for rate in sorted(set(ONESHOT_SWEEP) | set(args.rates)):
            if "oneshot" not in args.methods or ("oneshot", rate, seed) in done:
                continue
            model = copy.deepcopy(dense)
            t0 = time.time()
            run = run_oneshot(model, with_connectivity(config, rate), budget, data)
            record({"method": "oneshot", "rate": rate, "seed": seed, "wall_s": time.time() - t0, **run})
            log(f"seed {seed} rate {rate}: one-shot acc {run['test_acc']:.4f}")
        for rate in args.rates:
            cfg = with_connectivity(config, rate)
            for method in ("magnitude", "admm"):
                if method not in args.methods or (method, rate, seed) in done:
                    continue
                log(f"seed {seed} rate {rate}: {method} ({budget.total_epochs} epochs)")
                model = copy.deepcopy(dense)
                model.load_state_dict(dense_state)
                torch.manual_seed(seed)
                t0 = time.time()
                if method == "magnitude":
                    run = run_magnitude(model, cfg, budget, data, seed, args.progress)
                else:
                    onnx_path = args.workdir / f"{name}_admm_rate{rate}_seed{seed}.onnx"
                    run = run_admm(model, cfg, budget, data, seed, args.progress, onnx_path)
                record({"method": method, "rate": rate, "seed": seed, "wall_s": time.time() - t0, **run})
                log(f"seed {seed} rate {rate}: {method} acc {run['test_acc']:.4f} ({time.time() - t0:.0f} s)")
    dense_s = state["meta"].get("dense_train_s") or {}
    state["wall_s_total"] = sum(r["wall_s"] for r in state["runs"] if r["method"] != "dense" or str(r["seed"]) not in dense_s) \
        + sum(dense_s.values())
    write_json_atomic(json_path, state)
    write_outputs(state, args.results, name)
    return state


def with_connectivity(config: list[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """The config with every 3x3 entry at connectivity ``rate`` (1x1 entries keep their own rate)."""
    return [dict(c, connectivity=rate) if "connectivity" in c else dict(c) for c in config]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_markdown(state: dict[str, Any]) -> str:
    """Markdown table: method, rate, compression, accuracy (mean ± std over seeds), delta vs dense."""
    meta = state["meta"]
    runs = state["runs"]
    dense_acc, _ = _stats([r["test_acc"] for r in runs if r["method"] == "dense"])
    rates = meta["rates"]
    rows = [("dense", None)] + [(m, r) for r in rates for m in ("oneshot", "magnitude", "admm")]
    label = {"dense": "dense (unpruned)", "oneshot": "one-shot projection, no retraining",
             "magnitude": "magnitude projection + masked fine-tune", "admm": "extended ADMM + masked retrain"}
    lines = [f"### {meta['title']}", "",
             "| method | connectivity | compression (pruned convs / all convs) | epochs | test accuracy | vs dense | seeds | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rate in rows:
        sel = [r for r in runs if r["method"] == method and r["rate"] == rate]
        if not sel:
            continue
        mean, std = _stats([100 * r["test_acc"] for r in sel])
        comp = f"{sel[0]['pruned_layer_compression']:.2f}x / {sel[0]['conv_compression']:.2f}x"
        by_kind = sel[0].get("compression_by_kind", {})
        if len(by_kind) > 1:
            comp += " (" + ", ".join(f"{'3x3' if k == 'pattern' else '1x1' if k == 'pointwise' else k} {v:.2f}x"
                                     for k, v in by_kind.items()) + ")"
        wall = statistics.fmean(r["wall_s"] for r in sel)
        if method == "dense" and meta.get("dense_train_s"):  # trained here (possibly in an earlier, cached run)
            wall = statistics.fmean(meta["dense_train_s"].values())
        lines.append(f"| {label[method]} | {'-' if rate is None else f'{rate:g}x'} | {comp} | {sel[0].get('epochs', 0)} | "
                     f"{mean:.2f} ± {std:.2f} % | {mean - 100 * dense_acc:+.2f} pp | "
                     f"{','.join(str(r['seed']) for r in sel)} | {wall / 60:.1f} min |")
    b = meta["budget"]
    extras = []
    if b.get("pointwise"):
        extras.append(f"1x1 convs keep 1/{b['pointwise']:g} of their weights in {b['pointwise_block'][0]}x"
                      f"{b['pointwise_block'][1]} blocks (output x input channels).")
    if b.get("bn_recal_images"):
        extras.append(f"BatchNorm statistics re-estimated on {b['bn_recal_images']} training images right after "
                      "hard pruning (both methods).")
    hard = [(r["test_acc"], r.get("acc_after_hard_prune"), r.get("acc_after_bn_recal")) for r in runs if r["method"] == "admm"]
    if hard and hard[0][1] is not None:
        extras.append("ADMM accuracy right after hard pruning: " + ", ".join(
            f"{100 * h:.2f} %" + (f" ({100 * c:.2f} % after BN recalibration)" if c is not None else "") for _, h, c in hard) + ".")
    lines += [""] + extras + [f"Budget: ADMM {b['admm_epochs']} epochs ({b['rounds_per_epoch']} ADMM rounds/epoch, rho {b['rho']:g} "
              f"x{b['rho_growth']:g}/round, cap {b['rho_max']:g}) + {b['retrain_epochs']} masked-retrain epochs; "
              f"magnitude baseline fine-tunes {b['admm_epochs'] + b['retrain_epochs']} epochs. SGD momentum {b['momentum']}, "
              f"weight decay {b['weight_decay']}, batch {b['batch_size']}, {b['n_patterns']} patterns (4 taps, centre kept). "
              f"Train images {meta['train_images']}, test images {meta['test_images']}, {meta['threads']} thread(s), "
              f"torch {meta['torch']}.",
              f"Selected patterns: {', '.join(format_pattern(p) for p in state.get('selected_patterns', []))}.",
              f"Command: `{module_command(meta['command'])}`; total measured wall time "
              f"{state.get('wall_s_total', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def write_outputs(state: dict[str, Any], results: Path, name: str) -> None:
    """Markdown table, pattern-frequency histogram and accuracy-vs-rate plot (all atomic)."""
    write_bytes_atomic(results / f"{name}.md", table_markdown(state).encode())
    if "pattern_frequencies" in state:
        plot_pattern_frequencies({int(k): v for k, v in state["pattern_frequencies"].items()},
                                 results / f"{name}_pattern_frequencies.png",
                                 title=f"{state['meta']['title']}: top-4 kernel shapes of the dense weights",
                                 selected=state["selected_patterns"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = state["runs"]
    # Left: every method over the full accuracy range (one-shot collapses at high rates);
    # right: the same data zoomed on the dense level, where the retrained methods differ.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = [100 * r["test_acc"] for r in runs if r["method"] == "dense"]
    styles = {"oneshot": ("tab:gray", "o", "one-shot projection"), "magnitude": ("tab:orange", "s", "magnitude + fine-tune"),
              "admm": ("tab:blue", "D", "ADMM + retrain")}
    for ax, zoom in zip(axes, (False, True)):
        if dense:
            ax.axhline(statistics.fmean(dense), color="black", linestyle="--", label="dense")
        for method, (color, marker, label) in styles.items():
            by_rate: dict[float, list[dict[str, Any]]] = {}
            for r in runs:
                if r["method"] == method:
                    by_rate.setdefault(r["rate"], []).append(r)
            if not by_rate:
                continue
            xs = sorted(by_rate)
            comp = [statistics.fmean(r["pruned_layer_compression"] for r in by_rate[x]) for x in xs]
            acc = [statistics.fmean(100 * r["test_acc"] for r in by_rate[x]) for x in xs]
            ax.plot(comp, acc, color=color, marker=marker, label=label)
        ax.set_xlabel("compression of the pruned conv layers (dense weights / nonzeros)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        if zoom:
            retrained = [100 * r["test_acc"] for r in runs if r["method"] != "oneshot"]
            ax.set_ylim(min(retrained) - 1.0, max(retrained) + 0.5)
            ax.set_title("zoom on the retrained methods")
        else:
            ax.set_ylim(0, 100)
            ax.set_title(f"{state['meta']['title']}: accuracy vs pruning rate", fontsize=10)
            ax.legend(loc="lower left")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(results / f"{name}_accuracy_vs_rate.png", buffer.getvalue())


def train_dense(name: str, make_model: Callable[[], nn.Module], seed: int, epochs: int, data: dict[str, torch.Tensor],
                workdir: Path, progress: bool | None, lr: float = 0.05) -> tuple[nn.Module, float]:
    """Train (or reload) the dense model of ``seed``: SGD Nesterov momentum, cosine LR from ``lr``.

    The model is checkpointed in ``workdir`` with its training time, so reruns and resumed runs
    reuse it. Returns the model and the seconds its training took (when it was trained)."""
    path = workdir / f"{name}_dense_seed{seed}_ep{epochs}_n{len(data['xtr'])}.pt"
    torch.manual_seed(seed)
    model = make_model()
    if path.exists():
        info = load_checkpoint(path, model=model)
        log(f"dense seed {seed}: reloaded {path} (trained in {info['extra']['train_s'] / 60:.1f} min)")
        return model, info["extra"]["train_s"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(data["xtr"]) / 128)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        loss = train_epoch(model, data["xtr"], data["ytr"], optimizer, batch_size=128, generator=generator,
                           scheduler=scheduler, progress=progress, desc=f"dense ep{epoch}")
        log(f"dense seed {seed} epoch {epoch}: loss {loss:.4f} acc {evaluate(model, data['xte'], data['yte']):.4f}")
    workdir.mkdir(parents=True, exist_ok=True)
    train_s = time.time() - t0
    save_checkpoint(path, model=model, epoch=epochs, extra={"train_s": train_s})
    return model, train_s


#: Fashion-MNIST training-set pixel mean and std.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def load_fashion(train_subset: int = 0) -> dict[str, torch.Tensor]:
    """Normalised Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60k train (or the first
    ``train_subset``) and 10k test images."""
    from tvm_patdnn.datasets import load_fashion_mnist

    xtr, ytr = as_tensors(*load_fashion_mnist("train"), FASHION_MEAN, FASHION_STD)
    xte, yte = as_tensors(*load_fashion_mnist("test"), FASHION_MEAN, FASHION_STD)
    if train_subset:
        xtr, ytr = xtr[:train_subset], ytr[:train_subset]
    log(f"Fashion-MNIST: {len(xtr)} train / {len(xte)} test images")
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def as_tensors(x: np.ndarray, y: np.ndarray, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float tensor images and int64 labels."""
    return (torch.from_numpy(x) - mean) / std, torch.from_numpy(y)
