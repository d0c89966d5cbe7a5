"""The instruction mix of the pattern conv's inner loops on NEON, AVX2 and AVX-512, from the generated code.

No phone is attached and the host may lack AVX-512, so what can be compared across ISAs without
timing is the code itself: the pruned VGG-16 CIFAR (``models.py``, 8 patterns, 3.6x
connectivity) is compiled with default schedules for each target, and in every pattern conv's
innermost loops that do multiply-adds (one iteration = one kernel of a (filter, pattern) run, its
taps and register tile unrolled) the static instructions are counted:

- FMAs (``vfmadd*``; ``fmla``, by-element ``fmla v.s[i]`` included), with the lanes they fill;
- vector loads (``vmovups``/``vmovaps`` and permutes such as ``vpermps`` from memory, ``ldr q``/``ldur q``/
  ``ldp q``/``ld1``) and broadcasts (``vbroadcastss``, ``vbroadcastf32x4``, embedded ``{1toN}``; ``ld1r``, ``dup``);
- stack traffic (spills: memory operands on ``%rsp``/``sp``) and everything else (address
  arithmetic, loop control).

Loads per FMA well below one and few other instructions per FMA is what lets a core issue an FMA
every cycle on each pipe; a Cortex-A76 has 2 FMA and 2 load pipes and decodes 4 instructions a
cycle, a Zen 3 2 FMA pipes, 3 loads and 6 dispatch slots. Counts are static (per loop body), not
weighted by trip counts.

    .venv/bin/python -m benchmarks.instruction_mix [--targets neon avx2 avx512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import tvm_patdnn
from tvm_patdnn.fileio import write_bytes_atomic

from .models import twins

TARGETS = {
    "neon": "galaxy-s10",
    "avx2": {"kind": "llvm", "mcpu": "znver3"},
    "avx512": {"kind": "llvm", "mcpu": "skylake-avx512"},
}
LABEL = re.compile(r"^(\.?[\w.$]+):")
FUNCTION = re.compile(r"^\s*\.type\s+([\w.$]+),\s*[@%]function")
BRANCH = re.compile(r"^\s*(j\w+|b(\.\w+)?|cbn?z|tbn?z)\s+(?:.*,\s*)?(\.?[\w.$]+)\s*$")


@dataclass
class LoopMix:
    """Static counts of one innermost loop body."""

    instructions: int = 0
    fmas: int = 0
    fma_lanes: int = 0
    vector_loads: int = 0  # x86: FMAs with a memory operand included
    broadcasts: int = 0  # x86: embedded {1toN} broadcasts included
    spills: int = 0
    other: int = 0  # instructions that are none of the above (address arithmetic, loop control, stores)


def kernel_regions(asm: str) -> dict[str, list[str]]:
    """Each pattern conv's code: its ``*_compute_`` function and the parallel lambdas after it."""
    regions: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        match = FUNCTION.match(line)
        if match:
            name = match.group(1)
            if not name.startswith(".L__tvm_parallel_lambda"):
                current = name[: -len("_compute_")] if name.startswith("pattern_conv2d") and name.endswith("_compute_") else None
        if current is not None:
            regions.setdefault(current, []).append(line)
    return regions


def innermost_loops(lines: list[str]) -> list[list[str]]:
    """Bodies of the loops (a label and a later branch back to it) that contain no other loop."""
    labels = {}
    loops = []
    for index, line in enumerate(lines):
        match = LABEL.match(line)
        if match:
            labels[match.group(1)] = index
            continue
        branch = BRANCH.match(line)
        if branch and branch.group(3) in labels:
            loops.append((labels[branch.group(3)], index))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [lines[a + 1:b + 1] for a, b in inner]


def _x86(instruction: str, operands: str, mix: LoopMix) -> bool:
    """Count one instruction (AT&T syntax: sources first, the destination last); False if it is
    none of the classes."""
    width = 16 if "zmm" in operands else 8 if "ymm" in operands else 4
    memory = "(" in operands
    loads = memory and operands.split(",")[-1].strip().startswith("%")
    if instruction.startswith(("vfmadd", "vfnmadd", "vfmsub")):
        mix.fmas += 1
        mix.fma_lanes += width
        mix.broadcasts += "{1to" in operands
        mix.vector_loads += memory and "{1to" not in operands
    elif instruction.startswith(("vbroadcastss", "vbroadcastf32x")):  # f32x4: one kernel's 4 weights
        mix.broadcasts += 1
    elif memory and "%rsp" in operands and instruction.startswith("vmov"):
        mix.spills += 1
    elif loads and instruction.startswith(("vmovups", "vmovaps", "vmovdqu", "vperm")):  # vpermps from memory
        mix.vector_loads += 1
    else:
        return False
    return True


def _aarch64(instruction: str, operands: str, mix: LoopMix) -> bool:
    if instruction in ("fmla", "fmls"):
        mix.fmas += 1
        mix.fma_lanes += 4 if ".4s" in operands else 2 if ".2s" in operands or ".2d" in operands else 1
    elif instruction in ("ld1r", "dup"):
        mix.broadcasts += 1
    elif instruction.startswith(("ldr", "ldur", "ldp", "str", "stp", "stur")) and "[sp" in operands:
        mix.spills += 1
    elif instruction in ("ld1", "ld2", "ld3", "ld4") or (
            instruction in ("ldr", "ldur", "ldp") and re.match(r"\s*q\d", operands)):
        mix.vector_loads += 1 + (instruction == "ldp")
    else:
        return False
    return True


def loop_mix(body: list[str], aarch64: bool) -> LoopMix:
    mix = LoopMix()
    for line in body:
        text = line.split("//")[0].split("#")[0].strip()
        if not text or text.startswith(".") or LABEL.match(text):
            continue
        instruction, operands = (text.split(None, 1) + [""])[:2]
        mix.instructions += 1
        mix.other += not (_aarch64 if aarch64 else _x86)(instruction, operands, mix)
    return mix


def layer_mix(lines: list[str], aarch64: bool) -> dict:
    """Sum over the layer's innermost FMA loops, and how many there are."""
    loops = [m for m in (loop_mix(body, aarch64) for body in innermost_loops(lines)) if m.fmas]
    total = LoopMix()
    for mix in loops:
        for field in asdict(total):
            setattr(total, field, getattr(total, field) + getattr(mix, field))
    fmas = max(1, total.fmas)
    return {"loops": len(loops), **asdict(total),
            "loads_per_fma": (total.vector_loads + total.broadcasts) / fmas,
            "instructions_per_fma": total.instructions / fmas, "lanes_per_fma": total.fma_lanes / fmas}


def measure(targets: list[str]) -> list[dict]:
    model = twins("vgg16_cifar").pruned
    rows = []
    for name in targets:
        compiled = tvm_patdnn.compile(model, TARGETS[name], tuning_db=False)
        shapes = {r.name: r for r in compiled.report if r.kind == "pattern"}
        asm = "\n".join(m.inspect_source("asm") for m in compiled.executable.mod.imports if m.kind == "llvm")
        for kernel, lines in sorted(kernel_regions(asm).items(), key=lambda kv: int(re.sub(r"\D", "", kv[0]) or 0)):
            record = shapes.get(kernel[len("pattern_conv2d_"):])
            rows.append({"target": name, "layer": kernel[len("pattern_conv2d_"):],
                         "shape": f"{record.weight_shape[1]}->{record.weight_shape[0]} {record.output_shape[-1]}x{record.output_shape[-1]}"
                         if record else "", **layer_mix(lines, name == "neon")})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| target | layer | shape | FMA loops | FMAs | lanes/FMA | vector loads | broadcasts | spills | other | "
            "loads/FMA | instructions/FMA |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['target']} | {r['layer']} | {r['shape']} | {r['loops']} | {r['fmas']} | {r['lanes_per_fma']:.1f} | "
                     f"{r['vector_loads']} | {r['broadcasts']} | {r['spills']} | {r['other']} | "
                     f"{r['loads_per_fma']:.2f} | {r['instructions_per_fma']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = measure(args.targets)
    print(table(rows))
    if args.json:
        write_bytes_atomic(args.json, json.dumps(rows, indent=1).encode())


if __name__ == "__main__":
    main()
