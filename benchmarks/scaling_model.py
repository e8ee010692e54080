"""Images/s and scaling efficiency of one CPSC-DFKD distillation on 1 to 64 GPUs (NVLink inside nodes of
8, a 100 or 400 Gb/s network between nodes), and the first bottleneck: a model fed with measured
figures, since no multi-GPU machine was available (BENCHMARKS.md, "Scaling past one machine").

    python benchmarks/scaling_model.py --json benchmarks/results/2026-12-02-scaling/scaling.json
    python benchmarks/scaling_model.py --count-flops benchmarks/results/2026-12-02-scaling/step_flops_split.json

Inputs, each an argument with these defaults:
- One GPU's seconds per iteration at two batches, from measured images/s (issue 2's H100 runs,
  benchmarks/results/2026-11-26-h100/), fitted as ``t(b) = fixed + per_image * b``. ``fixed`` is the
  launch-bound floor of the steps: it is paid whatever the local batch, so more GPUs do not shrink it.
  Peak memory is fitted the same way. ``--measured`` takes other figures (the GPU check's, a CPU's).
- How the per-image time splits into generator and student steps, and a student step's share that is
  the student's backward: FLOP shares counted on the CPU (``--count-flops``).
- What each step sends and what every rank repeats (scaling_inputs.py).

Communication: NCCL's ring model. A collective of S bytes on n GPUs moves ``2(n-1)/n S`` (all-reduce),
``(n-1)/n S`` (all-gather, reduce-scatter of the gathered S) or S (broadcast) over each GPU's NVLink
and, across nodes, through each node's network links; the ring is pipelined, so the slower of the two
sets the pace. Latency: NCCL's base plus per-hop figures, hops inside a node at NVLink's, the
crossings between nodes at the network's; the faster of NCCL's LL and Simple protocols is taken.
Exposure: SupCon's gathers and the BN statistics' all-reduces block the step (the loss needs them);
DDP's generator all-reduce waits for the backward to reach the generator, the first module, so
nothing hides it; the student's buckets overlap its backward, all but what outlasts it (at least the
last bucket). Not modelled: NCCL's tree and NVLS algorithms (faster for small all-reduces across
many nodes) and compute slowed by concurrent communication.

Efficiency: images/s on n GPUs over n x one GPU's images/s at the shipped batch 512. The first
bottleneck: the part of the iteration that costs the most efficiency, i.e. exceeds n ideal copies of
that one-GPU run at this local batch (a communication, SupCon repeated on every rank, or the fixed
per-step cost that a smaller local batch no longer amortises). ``anchors: local`` rows are a what-if:
each rank contrasting only its own embeddings against the gathered batch (1/n of the N x N work).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from scaling_inputs import (
    ContrastiveCost,
    count_contrastive,
    count_step_flops,
    feature_width,
    fit,
    measured_points,
    traffic,
)
from step_throughput import CLASSES, SPEC

from cpsc_ray.config import load_config
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
H100_RUNS = [RESULTS / "2026-11-26-h100" / f"throughput_b{b}.json" for b in (256, 512)]
STEP_FLOPS = RESULTS / "2026-12-02-scaling" / "step_flops_split.json"
REFERENCE_BATCH = 512
# The shipped config of each pair, and its measured engine variants: issue 13 found that "engine bf16"
# then ran channels_last too, so both ResNet columns are the shipped bf16 + channels_last configuration;
# the WRN pair's bf16 run did not finish at batch 512, so its fp32 channels_last runs stand in.
SHIPPED = {
    "resnet34-resnet18": ("cifar100_resnet34_resnet18", ("engine bf16", "engine bf16 channels_last"), "bf16"),
    "wrn_40_2-wrn_16_2": ("cifar100_wrn40_2_wrn16_2", ("engine fp32 channels_last",), "fp32"),
}
# NCCL's tuning model (src/graph/tuning.cc, NCCL 2.18 and later), ring algorithm: base latency, latency
# per hop over NVLink and over the network (microseconds), and the share of link bandwidth moved.
PROTOCOLS = {"LL": (6.6, 0.6, 2.7, 1 / 4), "Simple": (8.4, 3.4, 14.0, 1.0)}
# NVLink per GPU and direction: half of NVIDIA's bidirectional 900 GB/s (NVLink 4: H100, H200) and
# 1.8 TB/s (NVLink 5: B200). NCCL reaches 741 of the 900 GB/s on an HGX H100 (ASTRA-sim's validation).
NVLINK_GB_S = {4: 450.0, 5: 900.0}
NVLINK_EFFICIENCY = 741 / 900
# Assumed: NCCL over RDMA (InfiniBand, RoCE) moves about 90% of the line rate for large messages.
NETWORK_EFFICIENCY = 0.9


@dataclass(frozen=True)
class GPU:
    """What the repeated SupCon work and the memory check need: capacity (GiB as torch reports it),
    memory bandwidth (TB/s), matrix-product rate (TFLOP/s) by precision."""

    name: str
    memory_gib: float
    memory_tb_s: float
    matmul_tflops: dict[str, float]


# bf16: the product benchmarks/step_flops.py timed on those H100s (BENCHMARKS.md, "GPU check");
# fp32: the datasheet's non-tensor peak (PyTorch's default float32 matmul precision uses no TF32).
H100 = GPU("H100 SXM 80GB", 79.2, 3.35, {"bf16": 798.0, "fp32": 67.0})


@dataclass(frozen=True)
class Fabric:
    network_gbps: float  # between nodes: each node's links together, one direction
    nvlink: int = 4
    gpus_per_node: int = 8


def collective_seconds(collective: str, nbytes: float, gpus: int, fabric: Fabric) -> float:
    if gpus == 1:
        return 0.0
    nodes = -(-gpus // fabric.gpus_per_node)
    share, hops, crossings = {
        "all_reduce": (2 * (gpus - 1) / gpus, 2 * (gpus - 1), 2 * nodes if nodes > 1 else 0),
        "all_gather": ((gpus - 1) / gpus, gpus - 1, nodes - 1),
        "reduce_scatter": ((gpus - 1) / gpus, gpus - 1, nodes - 1),
        "broadcast": (1.0, gpus - 1, nodes - 1),
    }[collective]
    nvlink = NVLINK_GB_S[fabric.nvlink] * 1e9 * NVLINK_EFFICIENCY
    network = fabric.network_gbps / 8 * 1e9 * NETWORK_EFFICIENCY
    best = float("inf")
    for base, hop, crossing, bandwidth in PROTOCOLS.values():
        links = share * nbytes / (nvlink * bandwidth)
        if nodes > 1:
            links = max(links, share * nbytes / (network * bandwidth))
        latency = (base + (hops - crossings) * hop + crossings * crossing) * 1e-6
        best = min(best, latency + links)
    return best


@dataclass(frozen=True)
class Pair:
    """One teacher/student pair at its shipped config, with one GPU's fitted figures."""

    name: str
    engine: DistillEngine  # single-process, on the CPU: only its models and config are read
    precision: str
    fixed_s: float
    per_image_s: float
    memory_fixed_gib: float | None
    memory_per_image_gib: float | None
    generator_share: float
    student_backward_share: float
    contrastive: ContrastiveCost
    local_anchors: bool = False  # the what-if: each rank's own rows of the N x N work only

    def contrastive_seconds(self, gpus: int, global_batch: float, gpu: GPU) -> float:
        seconds = self.contrastive.seconds(2 * global_batch, gpu.matmul_tflops[self.precision], gpu.memory_tb_s)
        return seconds / gpus if self.local_anchors else seconds

    def memory_gib(self, gpus: int, global_batch: float) -> float | None:
        if self.memory_fixed_gib is None:
            return None
        contrastive = self.contrastive.peak_bytes(2 * global_batch) / (gpus if self.local_anchors else 1)
        return self.memory_fixed_gib + self.memory_per_image_gib * global_batch / gpus + contrastive / 2**30


def iteration_seconds(pair: Pair, gpus: int, global_batch: int, fabric: Fabric, gpu: GPU) -> dict[str, float]:
    """One iteration's seconds on ``gpus`` GPUs of ``global_batch / gpus`` images each, by what they go to."""
    train = pair.engine.cfg.train
    local = global_batch / gpus
    work = pair.per_image_s * local
    student_step = (1 - pair.generator_share) * (pair.fixed_s + work) / train.s_steps
    parts = {
        "per-image work": work,
        "fixed per-step cost": pair.fixed_s,
        "SupCon repeated on every rank": train.g_steps * pair.contrastive_seconds(gpus, global_batch, gpu),
    }
    times = {"generator": train.g_steps, "student": train.s_steps, "epoch": 1 / train.iterations_per_epoch}
    student_buckets = []
    for message in traffic(pair.engine, gpus, int(local)):
        seconds = collective_seconds(message.collective, message.nbytes, gpus, fabric)
        if message.what == "student gradients":
            student_buckets.append(seconds)
            continue
        parts[message.what] = parts.get(message.what, 0.0) + times[message.step] * seconds
    if student_buckets:
        hidden = pair.student_backward_share * student_step
        exposed = max(student_buckets[-1], sum(student_buckets) - hidden)
        parts["student gradients"] = train.s_steps * exposed
    return parts


def predict(pair: Pair, gpus: int, global_batch: int, fabric: Fabric, gpu: GPU) -> dict:
    train = pair.engine.cfg.train
    per_iteration = (train.g_steps + train.s_steps) * global_batch
    parts = iteration_seconds(pair, gpus, global_batch, fabric, gpu)
    reference = iteration_seconds(pair, 1, REFERENCE_BATCH, fabric, gpu)
    images_per_s = per_iteration / sum(parts.values())
    efficiency = images_per_s / (gpus * (train.g_steps + train.s_steps) * REFERENCE_BATCH / sum(reference.values()))
    scale = global_batch / gpus / REFERENCE_BATCH
    costs = {name: seconds - reference.get(name, 0.0) * scale for name, seconds in parts.items()}
    costs.pop("per-image work")
    worst = max(costs, key=costs.get)
    memory = pair.memory_gib(gpus, global_batch)
    return {
        "gpus": gpus,
        "global_batch": global_batch,
        "network_gbps": fabric.network_gbps,
        "images_per_s": images_per_s,
        "efficiency": efficiency,
        "bottleneck": worst if costs[worst] > 0.01 * sum(parts.values()) else "none",
        "memory_gib": memory,
        "fits": memory is None or memory <= gpu.memory_gib,
        "seconds": parts,
    }


def batch_for(pair: Pair, gpus: int, fabric: Fabric, gpu: GPU) -> dict:
    """Efficiency at every global batch of ``gpus`` x a power of 2 up to the measured 512 each (beyond,
    one GPU's own speed-up from a larger batch would be extrapolated), and the smallest that reaches
    80% and 90% and fits in memory."""
    rows = [predict(pair, gpus, gpus * 2**k, fabric, gpu) for k in range(REFERENCE_BATCH.bit_length())]
    fitting = {r["global_batch"]: r["efficiency"] for r in rows if r["fits"]}
    best = max(fitting, key=fitting.get)
    return {
        "gpus": gpus,
        "network_gbps": fabric.network_gbps,
        "efficiency_by_global_batch": fitting,
        "smallest_for": {t: min((b for b, e in fitting.items() if e >= t), default=None) for t in (0.8, 0.9)},
        "best_batch": best,
        "best_efficiency": fitting[best],
    }


def build_pair(
    name: str, timings: dict[int, tuple[float, float | None]], precision: str, flops: dict, gpu: GPU
) -> Pair:
    """The pair's shipped config and models, and one GPU's figures fitted without SupCon's N^2 part."""
    config, _, _ = SHIPPED[name]
    cfg = load_config(config)
    engine = DistillEngine(cfg, build_model(cfg.teacher.arch, CLASSES), SPEC, device=torch.device("cpu"))
    contrastive = count_contrastive(feature_width(engine), CLASSES)
    g, s = cfg.train.g_steps, cfg.train.s_steps
    provisional = Pair(name, engine, precision, 0, 0, None, None, 0, 0, contrastive)
    seconds = {b: t - g * provisional.contrastive_seconds(1, b, gpu) for b, (t, _) in timings.items()}
    fixed_s, per_image_s = fit(seconds)
    memory = {b: m - contrastive.peak_bytes(2 * b) / 2**30 for b, (_, m) in timings.items() if m is not None}
    memory_fixed, memory_per_image = fit(memory) if memory else (None, None)
    counted = flops[name]
    generator = g * counted["generator_step"]
    return Pair(
        name,
        engine,
        precision,
        fixed_s,
        per_image_s,
        memory_fixed,
        memory_per_image,
        generator / (generator + s * counted["student_step"]),
        counted["student_backward"] / counted["student_step"],
        contrastive,
    )


def pair_rows(pair: Pair, gpus: list[int], fabrics: list[Fabric], gpu: GPU) -> tuple[list[dict], list[dict]]:
    """Weak scaling (512 per GPU) and, for the engine as it is, strong scaling (512 in all) at every GPU
    count and network; and the global batches that keep 8 and 64 GPUs at 80% and 90%."""
    tag = {"pair": pair.name, "anchors": "local" if pair.local_anchors else "all"}
    batches = {"weak": lambda n: n * REFERENCE_BATCH, "strong": lambda n: REFERENCE_BATCH}
    if pair.local_anchors:
        del batches["strong"]
    rows = [
        {**tag, "mode": mode, **predict(pair, n, batch(n), fabric, gpu)}
        for fabric in fabrics
        for n in gpus
        for mode, batch in batches.items()
        if batch(n) % n == 0
    ]
    needs = [{**tag, **batch_for(pair, n, fabric, gpu)} for n in (8, 64) for fabric in fabrics]
    return rows, needs


def markdown(rows: list[dict], needs: list[dict]) -> str:
    """Per pair, a row per GPU count: images/s (efficiency) at each network, where they differ, and the
    first bottleneck, for every scaling mode; then the batches that keep 8 and 64 GPUs efficient."""

    def cell(at: dict[float, dict]) -> str:
        shown = {f"{r['images_per_s']:,.0f} ({r['efficiency']:.0%})": r for r in at.values()}
        memory = {f"needs {r['memory_gib']:.0f} GiB" for r in at.values() if not r["fits"]}
        bottleneck = " / ".join(dict.fromkeys(r["bottleneck"] for r in at.values()))
        return " / ".join([*shown, *memory]) + f" | {bottleneck}"

    titles = {"weak": "512 per GPU", "strong": "512 in all"}
    networks = " / ".join(f"{g:g}" for g in sorted({r["network_gbps"] for r in rows}))
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        picked = [r for r in rows if r["pair"] == pair]
        columns = list(dict.fromkeys((r["anchors"], r["mode"]) for r in picked))
        heads = [
            f"{titles[mode]}, SupCon anchors {anchors}: {networks} Gb/s | first bottleneck" for anchors, mode in columns
        ]
        lines += ["", f"{pair}: images/s (efficiency)", "", f"| GPUs | {' | '.join(heads)} |"]
        lines.append("|---" * (1 + 2 * len(columns)) + "|")
        for n in dict.fromkeys(r["gpus"] for r in picked):
            at = {
                c: {r["network_gbps"]: r for r in picked if (r["anchors"], r["mode"]) == c and r["gpus"] == n}
                for c in columns
            }
            lines.append(f"| {n} | {' | '.join(cell(at[c]) for c in columns)} |")
    lines += ["", "| pair | SupCon anchors | GPUs | network | 80%: smallest global batch | 90% | best (batch) |"]
    lines.append("|---" * 7 + "|")
    for need in needs:
        smallest = [f"{b:,}" if b else "not reached" for b in need["smallest_for"].values()]
        lines.append(
            f"| {need['pair']} | {need['anchors']} | {need['gpus']} | {need['network_gbps']:g} Gb/s | "
            f"{' | '.join(smallest)} | {need['best_efficiency']:.0%} ({need['best_batch']:,}) |"
        )
    return "\n".join(lines)


def parse_measured(items: list[str]) -> dict[str, dict[int, tuple[float, None]]]:
    """``PAIR=BATCH:IMAGES_PER_S,...`` (6 + 5 steps) -> pair -> batch -> (seconds per iteration, no memory)."""
    measured = {}
    for item in items:
        pair, _, points = item.partition("=")
        try:
            measured[pair] = {
                int(b): (11 * int(b) / float(x), None) for b, x in (p.split(":") for p in points.split(","))
            }
        except ValueError:
            raise SystemExit(
                f"--measured {item!r}: expected PAIR=BATCH:IMAGES_PER_S,... e.g. {list(SHIPPED)[0]}=256:8589"
            ) from None
        if pair not in SHIPPED:
            raise SystemExit(f"--measured {item!r}: the pair must be one of {list(SHIPPED)}")
    return measured


def inputs_of(pair: Pair, timings: dict) -> dict:
    """What the predictions of ``pair`` rest on, for the JSON."""
    fitted = {f.name: getattr(pair, f.name) for f in fields(Pair) if f.name not in ("name", "engine", "contrastive")}
    return {
        "measured": {b: {"seconds_per_iteration": t, "peak_gib": m} for b, (t, m) in timings.items()},
        **fitted,
        "contrastive": asdict(pair.contrastive),
        "messages_at_8_gpus_512_each": [asdict(m) for m in traffic(pair.engine, 8, REFERENCE_BATCH)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(SHIPPED), choices=list(SHIPPED))
    parser.add_argument("--throughput", nargs="+", type=Path, default=H100_RUNS, help="step_throughput.py JSON")
    parser.add_argument("--variants", nargs="+", default=[], help="PAIR=VARIANT[,VARIANT]: whose mean to fit")
    parser.add_argument("--measured", nargs="+", default=[], help="PAIR=BATCH:IMAGES_PER_S,...: instead of JSON")
    parser.add_argument("--precision", nargs="+", default=[], help="PAIR=bf16|fp32 of the measured runs")
    parser.add_argument("--step-flops", type=Path, default=STEP_FLOPS, help="--count-flops output")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--network-gbps", nargs="+", type=float, default=[100.0, 400.0], help="per node")
    parser.add_argument("--nvlink", type=int, choices=sorted(NVLINK_GB_S), default=4)
    parser.add_argument("--json", type=Path, help="write inputs, assumptions and predictions here")
    parser.add_argument("--count-flops", type=Path, help="count the FLOP split between steps into this JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.count_flops:
        args.count_flops.parent.mkdir(parents=True, exist_ok=True)
        args.count_flops.write_text(json.dumps(count_step_flops(), indent=2))
        return
    variants = {k: tuple(v.split(",")) for k, _, v in (item.partition("=") for item in args.variants)}
    precision = dict(item.partition("=")[::2] for item in args.precision)
    if not set(precision.values()) <= set(H100.matmul_tflops):
        raise SystemExit(f"--precision {args.precision}: expected PAIR=bf16 or PAIR=fp32")
    measured, flops = parse_measured(args.measured), json.loads(args.step_flops.read_text())
    fabrics = [Fabric(gbps, args.nvlink) for gbps in args.network_gbps]
    report = {"assumptions": assumptions(fabrics[0]), "inputs": {}, "scaling": [], "batch_for_efficiency": []}
    for name in args.pairs:
        shipped_variants, shipped_precision = SHIPPED[name][1:]
        timings = measured.get(name) or measured_points(args.throughput, name, variants.get(name, shipped_variants))
        pair = build_pair(name, timings, precision.get(name, shipped_precision), flops, H100)
        report["inputs"][name] = inputs_of(pair, timings)
        for variant in (pair, replace(pair, local_anchors=True)):
            rows, needs = pair_rows(variant, args.gpus, fabrics, H100)
            report["scaling"] += rows
            report["batch_for_efficiency"] += needs
    print(markdown(report["scaling"], report["batch_for_efficiency"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def assumptions(fabric: Fabric) -> dict:
    return {
        "gpu": asdict(H100),
        "gpus_per_node": fabric.gpus_per_node,
        "nvlink": fabric.nvlink,
        "nvlink_gb_s_per_direction": NVLINK_GB_S[fabric.nvlink],
        "nvlink_efficiency": NVLINK_EFFICIENCY,
        "network_efficiency": NETWORK_EFFICIENCY,
        "nccl_ring_protocols": {
            p: dict(zip(("base_us", "nvlink_hop_us", "network_hop_us", "bandwidth"), v)) for p, v in PROTOCOLS.items()
        },
        "reference_batch": REFERENCE_BATCH,
    }


if __name__ == "__main__":
    main()
