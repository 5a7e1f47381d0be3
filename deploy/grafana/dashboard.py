"""Writes ``mixserve.json``, the Grafana dashboard (run: ``python deploy/grafana/dashboard.py``).

Every panel's PromQL is checked against a real Prometheus scraping a loaded mixserve by
``tests/test_dashboard.py`` (marked slow).
"""

from __future__ import annotations

import json
from pathlib import Path

W = "[1m]"


def _quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{W})))", f"{legend}p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]  # fmt: skip


PANELS: list[dict] = [
    {"title": "Time to first token", "unit": "s", "targets": _quantiles("mixserve_time_to_first_token_seconds")},
    {"title": "Inter-token latency", "unit": "s", "targets": _quantiles("mixserve_inter_token_latency_seconds")},
    {"title": "Generated tokens/s", "unit": "short",
     "targets": [(f"sum(rate(mixserve_generated_tokens_total{W}))", "tokens/s"),
                 (f"sum by (mix) (rate(mixserve_generated_tokens_total{W}))", "{{mix}}")]},
    {"title": "Requests running / waiting", "unit": "short",
     "targets": [("sum(mixserve_requests_running)", "running"), ("sum(mixserve_requests_waiting)", "waiting")]},
    {"title": "Batch size (mean sequences per decode step)", "unit": "short",
     "targets": [(f"sum(rate(mixserve_batch_size_sum{W})) / sum(rate(mixserve_batch_size_count{W}))", "batch")]},
    {"title": "Mix cache hit ratio", "unit": "percentunit",
     "targets": [(f"sum(rate(mixserve_mix_cache_hits_total{W})) / (sum(rate(mixserve_mix_cache_hits_total{W})) + "
                  f"sum(rate(mixserve_mix_cache_misses_total{W})))", "hit ratio")]},
    {"title": "Mix cache entries", "unit": "short",
     "targets": [("sum(mixserve_mix_cache_entries)", "entries"),
                 (f"sum(increase(mixserve_mix_cache_evictions_total{W}))", "evictions / 1m")]},
    {"title": "Mix cache bytes by serving path (members: cores over the mix's adapters; factors)", "unit": "bytes",
     "targets": [("sum(mixserve_mix_cache_bytes)", "all"),
                 ("sum by (path) (mixserve_mix_cache_path_bytes)", "{{path}}")]},
    {"title": "Merges by serving path", "unit": "short",
     "targets": [(f"sum by (path) (increase(mixserve_mix_merges_total{W}))", "{{path}} merges / 1m")]},
    {"title": "Adapter pool: registered / resident / in use (slots)", "unit": "short",
     "targets": [("max(mixserve_adapters_registered)", "registered"),
                 ("max(mixserve_adapter_pool_slots)", "device slots"),
                 ("max(mixserve_adapter_pool_resident)", "resident"),
                 ("max(mixserve_adapter_pool_in_use)", "in use by running rows")]},
    {"title": "Adapter pool loads and evictions", "unit": "short",
     "targets": [(f"sum(increase(mixserve_adapter_pool_loads_total{W}))", "loads / 1m"),
                 (f"sum(increase(mixserve_adapter_pool_evictions_total{W}))", "evictions / 1m")]},
    {"title": "Merge seconds by method (p50 / p99)", "unit": "s",
     "targets": [(f"histogram_quantile(0.5, sum by (le, method) (rate(mixserve_merge_seconds_bucket{W})))", "{{method}} p50"),
                 (f"histogram_quantile(0.99, sum by (le, method) (rate(mixserve_merge_seconds_bucket{W})))", "{{method}} p99")]},
    {"title": "Running LoRA mixes", "unit": "short", "kind": "table",
     "targets": [("max by (running_lora_adapters, waiting_lora_adapters, max_lora) (mixserve_lora_requests_info)",
                  "{{running_lora_adapters}}")]},
    {"title": "End-to-end latency", "unit": "s", "targets": _quantiles("mixserve_e2e_request_latency_seconds")},
    {"title": "Admin state store: replicas reaching it, and version lag between replicas", "unit": "short",
     "targets": [("sum(mixserve_state_store_up)", "replicas reaching the store"),
                 ("count(mixserve_state_store_up)", "replicas"),
                 ("max(mixserve_state_store_version) - min(mixserve_state_store_version)", "version lag")]},
    {"title": "Finished requests by reason", "unit": "reqps",
     "targets": [(f"sum by (finish_reason) (rate(mixserve_requests_total{W}))", "{{finish_reason}}")]},
]  # fmt: skip


def build() -> dict:
    panels = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "title": p["title"],
            "type": "table" if p.get("kind") == "table" else "timeseries",
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "expr": expr, "legendFormat": legend,
                 "datasource": {"type": "prometheus", "uid": "prometheus"},
                 **({"instant": True, "format": "table"} if p.get("kind") == "table" else {})}
                for j, (expr, legend) in enumerate(p["targets"])
            ],
        })  # fmt: skip
    return {
        "uid": "mixserve",
        "title": "mixserve",
        "tags": ["mixserve", "llm", "lora"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("mixserve.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
