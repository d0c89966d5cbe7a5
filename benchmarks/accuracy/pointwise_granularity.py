"""How much each 1x1 pruning granularity costs before any retraining, on the dense Fashion-MNIST ResNet.

For unstructured, 4x1, 8x1 and 1x4 blocks at the same rate, every 1x1 conv of the dense
:class:`fashion_resnet.SmallBottleneckResNet` (3x3 layers left dense, to isolate the 1x1 effect)
is projected one-shot; reported are the fraction of the 1x1 weights' squared norm the projection
keeps (what ADMM has to recover: the larger, the easier) and the test accuracy right after
projection, with and without BatchNorm recalibration. No training, a minute on one core::

    python -m benchmarks.accuracy.pointwise_granularity --train-subset 10000 --dense-epochs 8 --seeds 0 1

The dense models come from ``fashion_resnet.py``'s cache in ``--workdir`` (trained if missing).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.pruning.projection import project_pointwise
from tvm_patdnn.pruning.sparsifier import default_config

from .common import RESULTS_DIR, load_fashion, log, module_command, recalibrate_bn, train_dense, write_json_atomic
from .fashion_resnet import SmallBottleneckResNet
from .training import evaluate

BLOCKS = ((1, 1), (4, 1), (8, 1), (1, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--bn-recal", type=int, default=5000, metavar="IMAGES")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tvm_patdnn_accuracy"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_fashion(args.train_subset)
    rows = []
    for seed in args.seeds:
        dense, _ = train_dense("fashion_resnet", SmallBottleneckResNet, seed, args.dense_epochs, data, args.workdir,
                               None, lr=0.1)
        dense_acc = evaluate(dense, data["xte"], data["yte"])
        fqns = [c["tensor_fqn"] for c in default_config(dense, pointwise=args.rate, block=(1, 1)) if "pointwise" in c]
        for block in BLOCKS:
            model = copy.deepcopy(dense)
            kept = total = 0.0
            with torch.no_grad():
                for fqn in fqns:
                    param = model.get_parameter(fqn)
                    w = param.detach().numpy()
                    projected = project_pointwise(w, args.rate, block)
                    kept += float(np.square(projected.astype(np.float64)).sum())
                    total += float(np.square(w.astype(np.float64)).sum())
                    param.copy_(torch.from_numpy(projected))
            acc = evaluate(model, data["xte"], data["yte"])
            recalibrate_bn(model, data["xtr"], args.bn_recal)
            recal = evaluate(model, data["xte"], data["yte"])
            rows.append({"seed": seed, "block": list(block), "rate": args.rate, "kept_norm2_fraction": kept / total,
                         "dense_acc": dense_acc, "oneshot_acc": acc, "oneshot_bn_recal_acc": recal})
            log(f"seed {seed} block {block[0]}x{block[1]}: kept |W|^2 {kept / total:.3f}, accuracy {acc:.4f} "
                f"({recal:.4f} after BN recalibration; dense {dense_acc:.4f})")
    args.results.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    write_json_atomic(args.results / "pointwise_granularity.json", {"command": command, "layers": fqns, "rows": rows})
    lines = [f"### 1x1 pruning granularity at {args.rate:g}x, one-shot on the dense Fashion-MNIST ResNet (3x3 dense)", "",
             "| block (out x in) | kept squared norm of the 1x1 weights | accuracy after projection | after BN recalibration | dense |",
             "|---|---|---|---|---|"]
    for block in BLOCKS:
        sel = [r for r in rows if tuple(r["block"]) == block]
        mean = lambda key: float(np.mean([r[key] for r in sel]))  # noqa: E731
        lines.append(f"| {block[0]}x{block[1]} | {mean('kept_norm2_fraction'):.3f} | {100 * mean('oneshot_acc'):.2f} % | "
                     f"{100 * mean('oneshot_bn_recal_acc'):.2f} % | {100 * mean('dense_acc'):.2f} % |")
    lines += ["", f"Seeds {args.seeds} (means); BN recalibration on {args.bn_recal} training images. Command: "
              f"`{module_command(command)}`."]
    write_bytes_atomic(args.results / "pointwise_granularity.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
