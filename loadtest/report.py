"""Benchmark output: JSON, a Markdown table with the target ratios, and PNG plots."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecomsearch.loadtest.load import LoadResult
from ecomsearch.loadtest.triton_stats import stage_compute_per_row_us

log = logging.getLogger(__name__)

# The concurrency at which the ensemble is compared with the naive baseline and with itself
# without dynamic batching (the performance targets' concurrency).
BATCHING_COMPARISON_CONCURRENCY = 16
# Passes over the queries at each batch size when pricing the pipeline's own compute (the best
# counts: noise on a shared machine only adds time).
FLOOR_PASSES = 3


@dataclass
class BenchReport:
    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Batch size -> stage -> CPU ms per query of the in-process pipeline (bench.compute_floor).
    compute_floor: dict[int, dict[str, float]] = field(default_factory=dict)

    def add(
        self,
        result: LoadResult,
        stages: dict | None = None,
        server_cpu_ms_per_request: float | None = None,
        client_cpu_ms_per_request: float | None = None,
        server_cpu_ms_by_process: dict[str, float] | None = None,
    ) -> None:
        summary = result.summary()
        if stages is not None:
            self.stages[f"{result.system}@{result.concurrency}"] = stages
            ensemble = self.settings.get("ensemble", "search")
            summary["stage_compute_per_row_ms"] = _ms(stage_compute_per_row_us(stages, ensemble))
        if server_cpu_ms_per_request is not None:
            summary["server_cpu_ms_per_request"] = round(server_cpu_ms_per_request, 3)
        if client_cpu_ms_per_request is not None:
            summary["client_cpu_ms_per_request"] = round(client_cpu_ms_per_request, 3)
        if server_cpu_ms_by_process is not None:
            summary["server_cpu_ms_by_process"] = server_cpu_ms_by_process
        self.runs.append(summary)
        log.info(
            "%-19s c=%-3d %7.1f req/s  p50 %7.2f ms  p99 %7.2f ms  (%d requests, %d errors)",
            result.system,
            result.concurrency,
            result.throughput_rps,
            result.percentile_ms(50),
            result.percentile_ms(99),
            result.requests,
            result.errors,
        )


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


def save_json(report: BenchReport, path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "settings": report.settings,
                "runs": report.runs,
                "stages": report.stages,
                "compute_floor": report.compute_floor,
            },
            indent=2,
        )
        + "\n"
    )


def _run(runs: list[dict[str, Any]], system: str, concurrency: int) -> dict[str, Any] | None:
    return next(
        (r for r in runs if r["system"] == system and r["concurrency"] == concurrency), None
    )


def target_ratios(runs: list[dict[str, Any]]) -> list[tuple[str, float | None, str]]:
    """(what, measured ratio, target) for each of the performance targets that the runs cover."""
    c = BATCHING_COMPARISON_CONCURRENCY

    def ratio(a, b, key):
        return a[key] / b[key] if a and b and b[key] else None

    triton, naive = _run(runs, "triton", c), _run(runs, "naive", c)
    unbatched = _run(runs, "triton_no_batching", c)
    triton_1, local_1 = _run(runs, "triton", 1), _run(runs, "in_process", 1)
    return [
        (f"throughput, ensemble / naive at c={c}", ratio(triton, naive, "throughput_rps"), ">= 5"),
        (f"p99, ensemble / naive at c={c}", ratio(triton, naive, "p99_ms"), "<= 0.33"),
        (
            f"throughput, batching on / off at c={c}",
            ratio(triton, unbatched, "throughput_rps"),
            ">= 2",
        ),
        ("p50, ensemble / in-process at c=1", ratio(triton_1, local_1, "p50_ms"), "<= 1.3"),
        (
            f"CPU per query at c={c}, ms: the stages' compute per row summed (Triton statistics)",
            triton.get("stage_compute_per_row_ms") if triton else None,
            "<= 3.5",
        ),
        (
            f"CPU per query at c={c}, ms: the server's CPU time per request (/proc)",
            triton.get("server_cpu_ms_per_request") if triton else None,
            "<= 3.5",
        ),
    ]


def markdown(report) -> str:
    lines = [
        "# ecomsearch benchmark",
        "",
        f"Settings: `{report.settings}`",
        "",
        "| system | concurrency | requests | errors | req/s | p50 ms | p90 ms | p99 ms "
        "| stages' compute per row ms | server CPU per request ms | load generator CPU per "
        "request ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def shown(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    for r in report.runs:
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['errors']} "
            f"| {r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {shown(r.get('stage_compute_per_row_ms'))} "
            f"| {shown(r.get('server_cpu_ms_per_request'))} "
            f"| {shown(r.get('client_cpu_ms_per_request'))} |"
        )
    lines += ["", "## Targets (ratios measured in this run)", "", "| ratio | measured | target |"]
    lines.append("|---|---|---|")
    for what, value, target in target_ratios(report.runs):
        measured = "not measured" if value is None else f"{value:.2f}"
        lines.append(f"| {what} | {measured} | {target} |")
    if report.compute_floor:
        lines += compute_floor_lines(report.compute_floor)
    if report.stages:
        lines += [
            "",
            "## Per-model time (Triton statistics API)",
            "",
            "Queue and compute are means per request (a batched request's compute is its "
            "batch's); compute per row shares each execution's compute among its rows; CPU is "
            "the model's processes' CPU time (/proc) per request of the run.",
            "",
            "| run | model | requests | queue us | compute us | compute per row us "
            "| rows per execution | CPU per request ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run, models in report.stages.items():
            for model, s in models.items():
                lines.append(
                    f"| {run} | {model} | {s['requests']} | {s['queue_us']} | {s['compute_us']} "
                    f"| {s.get('compute_per_row_us')} | {s['rows_per_execution']} "
                    f"| {shown(s.get('server_cpu_ms_per_request'))} |"
                )
        server_rows = [
            (f"{r['system']}@{r['concurrency']}", r["server_cpu_ms_by_process"])
            for r in report.runs
            if r.get("server_cpu_ms_by_process")
        ]
        if server_rows:
            lines += [
                "",
                "CPU per request of the processes outside the ensemble's steps (the server "
                "itself, other models' instances):",
                "",
            ]
            for run, by_process in server_rows:
                others = {
                    name: ms
                    for name, ms in by_process.items()
                    if name not in report.stages.get(run, {})
                }
                shown_others = ", ".join(f"{name} {ms:.2f} ms" for name, ms in others.items())
                lines.append(f"- {run}: {shown_others}")
    return "\n".join(lines) + "\n"


def compute_floor_lines(floor: dict[int, dict[str, float]]) -> list[str]:
    """The in-process pipeline's own CPU per query by stage and batch size, as Markdown."""
    stages = list(next(iter(floor.values())))
    lines = [
        "",
        "## The pipeline's own compute (in-process, no serving)",
        "",
        "CPU ms per query of each stage in one process, the queries in consecutive batches of "
        f"each size, best of {FLOOR_PASSES} passes: the floor of the CPU-per-query targets "
        "above. What a served figure adds to the floor at the batch size its stages formed is "
        "what serving costs.",
        "",
        "| batch size | " + " | ".join(stages) + " | total |",
        "|---" * (len(stages) + 2) + "|",
    ]
    for batch_size, by_stage in floor.items():
        cells = " | ".join(f"{by_stage.get(stage, 0.0):.2f}" for stage in stages)
        lines.append(f"| {batch_size} | {cells} | {sum(by_stage.values()):.2f} |")
    return lines


def plot(report, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in report.runs))
    paths = []
    for key, ylabel, name, log_scale in (
        ("p50_ms", "latency (ms)", "latency_vs_concurrency.png", True),
        ("throughput_rps", "throughput (requests/s)", "throughput_vs_concurrency.png", False),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for system in systems:
            runs = sorted(
                (r for r in report.runs if r["system"] == system), key=lambda r: r["concurrency"]
            )
            xs = [r["concurrency"] for r in runs]
            (line,) = axes.plot(xs, [r[key] for r in runs], marker="o", label=f"{system}")
            if key == "p50_ms":
                axes.plot(
                    xs,
                    [r["p99_ms"] for r in runs],
                    marker="x",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{system} p99",
                )
        axes.set_xscale("log", base=2)
        if log_scale:
            axes.set_yscale("log")
        axes.set_xlabel("concurrent clients (closed loop)")
        axes.set_ylabel(ylabel + (" (solid p50, dashed p99)" if key == "p50_ms" else ""))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(report, out_dir: Path) -> None:
    save_json(report, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(markdown(report))
    plot(report, out_dir)
