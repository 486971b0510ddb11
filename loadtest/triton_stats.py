"""Per-model time from Triton's statistics API: queue and compute per request, batch sizes."""

from __future__ import annotations

from typing import Any


def snapshot(url: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Cumulative counters of every model, from GetModelStatistics (an admin protocol: pass the
    server's admin headers, TritonServer.admin_headers)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(as_json=True, headers=headers)
    counters = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})
        counters[model["name"]] = {
            "inference_count": int(model.get("inference_count", 0)),
            "execution_count": int(model.get("execution_count", 0)),
            "requests": int(inference.get("success", {}).get("count", 0)),
            "cache_hits": int(inference.get("cache_hit", {}).get("count", 0)),
            "cache_misses": int(inference.get("cache_miss", {}).get("count", 0)),
            **{
                f"{part}_ns": int(inference.get(part, {}).get("ns", 0))
                for part in ("queue", "compute_input", "compute_infer", "compute_output")
            },
            # Each request of a batch is charged the whole batch's compute above; per
            # execution, summed over batch sizes, it is charged once.
            "execution_compute_ns": sum(
                int(entry.get(part, {}).get("ns", 0))
                for entry in model.get("batch_stats", [])
                for part in ("compute_input", "compute_infer", "compute_output")
            ),
        }
    return counters


def breakdown(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """Per model, over the interval: mean queue and compute time per request (microseconds;
    a batched request's compute is its whole batch's), compute per row (each execution's
    compute shared among its rows: what a query costs the stage) and the mean dynamic batch
    (rows per execution)."""
    result = {}
    for name, end in after.items():
        start = before.get(name, {})
        delta = {key: value - start.get(key, 0) for key, value in end.items()}
        requests = delta["requests"]
        if requests <= 0:
            continue
        compute_ns = (
            delta["compute_input_ns"] + delta["compute_infer_ns"] + delta["compute_output_ns"]
        )
        result[name] = {
            "requests": requests,
            "queue_us": round(delta["queue_ns"] / requests / 1000, 1),
            "compute_us": round(compute_ns / requests / 1000, 1),
            "compute_per_row_us": (
                round(delta["execution_compute_ns"] / delta["inference_count"] / 1000, 1)
                if delta["inference_count"]
                else None
            ),
            "cache_hit_rate": (
                round(delta["cache_hits"] / (delta["cache_hits"] + delta["cache_misses"]), 4)
                if delta.get("cache_hits", 0) + delta.get("cache_misses", 0)
                else None
            ),
            "rows_per_execution": (
                round(delta["inference_count"] / delta["execution_count"], 2)
                if delta["execution_count"]
                else None
            ),
        }
    return result


def stage_compute_per_row_us(stages: dict[str, dict[str, Any]], ensemble: str) -> float | None:
    """The sum over the pipeline's models (the ensemble itself aside, whose "compute" is its
    steps') of their compute per row: the serving time one query costs across the stages."""
    values = [
        s["compute_per_row_us"]
        for name, s in stages.items()
        if name != ensemble and s.get("compute_per_row_us") is not None
    ]
    return round(sum(values), 1) if values else None
