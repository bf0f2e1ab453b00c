"""Operations as code: writes the Grafana dashboard and the Prometheus rules from one description.

    python deploy/generate.py           # (re)write the files below
    python deploy/generate.py --check   # exit 1 if a file differs from what would be written

Writes ``deploy/grafana/dashboards/palm-serve.json`` and ``deploy/prometheus/rules.yml``. The input-drift
rules take their reference values from the model card's ``input_baseline`` (``python -m
export.baseline --card``), so a new model brings its own baseline. Every PromQL expression of a panel
or a rule is listed by :func:`expressions`, which the integration test evaluates against a real
Prometheus scraping a real gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "model_repository" / "palm" / "1" / "model_card.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "palm-serve.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

DRIFT_Z = 3.0
"""An input statistic drifts when its 1 h mean is more than this many baseline standard deviations off."""
DRIFT_MIN_FILES = 5
"""Files needed in the hour before the drift rule judges."""
DRIFT_STATISTICS = {
    "channel_mean_r": (
        'palm_input_channel_mean_sum{channel="r"}',
        'palm_input_channel_mean_count{channel="r"}',
    ),
    "channel_mean_g": (
        'palm_input_channel_mean_sum{channel="g"}',
        'palm_input_channel_mean_count{channel="g"}',
    ),
    "channel_mean_b": (
        'palm_input_channel_mean_sum{channel="b"}',
        'palm_input_channel_mean_count{channel="b"}',
    ),
    "channel_spread_r": (
        'palm_input_channel_spread_sum{channel="r"}',
        'palm_input_channel_spread_count{channel="r"}',
    ),
    "channel_spread_g": (
        'palm_input_channel_spread_sum{channel="g"}',
        'palm_input_channel_spread_count{channel="g"}',
    ),
    "channel_spread_b": (
        'palm_input_channel_spread_sum{channel="b"}',
        'palm_input_channel_spread_count{channel="b"}',
    ),
    "colourfulness": ("palm_input_colourfulness_sum", "palm_input_colourfulness_count"),
}


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (expression, legend)
    unit: str = "short"
    gpu_only: bool = False
    """Only a GPU Triton exports these series; on CPU the panel stays empty."""


def rate_ratio(numerator: str, denominator: str, window: str) -> str:
    return f"sum(rate({numerator}[{window}])) / sum(rate({denominator}[{window}]))"


def rows() -> list[tuple[str, list[Panel]]]:
    return [
        (
            "Gateway (rate, errors, duration)",
            [
                Panel(
                    "Requests per second by route",
                    (("sum by (route) (rate(palm_http_requests_total[5m]))", "{{route}}"),),
                    "reqps",
                ),
                Panel(
                    "Server error ratio by route",
                    (
                        (
                            '1 - sum by (route) (rate(palm_http_requests_total{status!~"5.."}[5m]))'
                            " / sum by (route) (rate(palm_http_requests_total[5m]))",
                            "{{route}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Latency p50 / p95 by route",
                    (
                        (
                            "histogram_quantile(0.5, sum by (le, route) (rate(palm_http_request_duration_seconds_bucket[5m])))",
                            "p50 {{route}}",
                        ),
                        (
                            "histogram_quantile(0.95, sum by (le, route) (rate(palm_http_request_duration_seconds_bucket[5m])))",
                            "p95 {{route}}",
                        ),
                    ),
                    "s",
                ),
                Panel("Requests in flight", (("palm_http_requests_in_flight", "in flight"),)),
                Panel(
                    "Images by outcome",
                    (("sum by (outcome) (rate(palm_images_total[5m]))", "{{outcome}}"),),
                    "ops",
                ),
                Panel(
                    "Tiles per second", (("sum by (outcome) (rate(palm_tiles_total[5m]))", "{{outcome}}"),)
                ),
                Panel(
                    "Detections per second by category",
                    (("sum by (category) (rate(palm_detections_total[5m]))", "{{category}}"),),
                ),
            ],
        ),
        (
            "Triton",
            [
                Panel(
                    "Queue vs compute time per request",
                    (
                        (
                            "sum(rate(nv_inference_queue_duration_us[5m])) / sum(rate(nv_inference_request_success[5m])) / 1e6",
                            "queue",
                        ),
                        (
                            "sum(rate(nv_inference_compute_infer_duration_us[5m])) / sum(rate(nv_inference_request_success[5m])) / 1e6",
                            "compute",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Realised batch size (tiles per execution)",
                    (
                        (
                            "sum(rate(nv_inference_count[5m])) / sum(rate(nv_inference_exec_count[5m]))",
                            "tiles per execution",
                        ),
                    ),
                ),
                Panel("Pending requests", (("sum(nv_inference_pending_request_count)", "pending"),)),
                Panel(
                    "Gateway's Triton call latency p95",
                    (
                        (
                            "histogram_quantile(0.95, sum by (le) (rate(palm_triton_request_duration_seconds_bucket[5m])))",
                            "p95",
                        ),
                    ),
                    "s",
                ),
                Panel("Model ready", (("palm_triton_ready", "ready"),)),
                Panel(
                    "GPU utilisation", (("nv_gpu_utilization", "{{gpu_uuid}}"),), "percentunit", gpu_only=True
                ),
                Panel(
                    "GPU memory used", (("nv_gpu_memory_used_bytes", "{{gpu_uuid}}"),), "bytes", gpu_only=True
                ),
            ],
        ),
        (
            "Jobs",
            [
                Panel("Jobs by status", (("sum by (status) (palm_jobs)", "{{status}}"),)),
                Panel("Job tiles per second", (("sum(rate(palm_job_tiles_total[5m]))", "tiles/s"),)),
                Panel(
                    "Files waiting and running",
                    (("sum(palm_job_files_waiting)", "waiting"), ("sum(palm_job_files_running)", "running")),
                ),
                Panel(
                    "Job files by outcome",
                    (("sum by (outcome) (rate(palm_job_files_total[5m]))", "{{outcome}}"),),
                    "ops",
                ),
                Panel(
                    "Job duration p95",
                    (
                        (
                            "histogram_quantile(0.95, sum by (le) (rate(palm_job_duration_seconds_bucket[1h])))",
                            "p95",
                        ),
                    ),
                    "s",
                ),
            ],
        ),
        (
            "Webhooks and access",
            [
                Panel(
                    "Webhook events settled by outcome",
                    (("sum by (outcome) (rate(palm_webhook_deliveries_total[15m]))", "{{outcome}}"),),
                    "ops",
                ),
                Panel(
                    "Webhook attempts by outcome",
                    (("sum by (outcome) (rate(palm_webhook_attempts_total[5m]))", "{{outcome}}"),),
                    "ops",
                ),
                Panel(
                    "Webhook attempt duration p50 / p95",
                    (
                        (
                            "histogram_quantile(0.5, sum by (le) (rate(palm_webhook_delivery_duration_seconds_bucket[15m])))",
                            "p50",
                        ),
                        (
                            "histogram_quantile(0.95, sum by (le) (rate(palm_webhook_delivery_duration_seconds_bucket[15m])))",
                            "p95",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Refused API calls by reason",
                    (("sum by (reason) (rate(palm_auth_failures_total[5m]))", "{{reason}}"),),
                    "reqps",
                ),
            ],
        ),
        (
            "Input drift (against the model card's baseline)",
            [
                Panel(
                    "Channel means of the model's input (1 h)",
                    (("palm:input_channel_mean:mean1h", "{{channel}}"),),
                ),
                Panel(
                    "Colourfulness (1 h; 0 is grey)", (("palm:input_colourfulness:mean1h", "colourfulness"),)
                ),
                Panel(
                    "Drift, in baseline standard deviations", (("palm:input_drift_zscore", "{{statistic}}"),)
                ),
                Panel(
                    "Valid pixel fraction (1 h)",
                    (("palm:input_valid_fraction:mean1h", "valid"),),
                    "percentunit",
                ),
                Panel("Ground sample distance (1 h)", (("palm:input_gsd_meters:mean1h", "GSD"),), "lengthm"),
                Panel(
                    "Detections per tile p50 / p95",
                    (
                        (
                            "histogram_quantile(0.5, sum by (le) (rate(palm_tile_detections_bucket[15m])))",
                            "p50",
                        ),
                        (
                            "histogram_quantile(0.95, sum by (le) (rate(palm_tile_detections_bucket[15m])))",
                            "p95",
                        ),
                    ),
                ),
                Panel(
                    "Detection scores (share per bucket)",
                    (
                        (
                            "sum by (le) (rate(palm_detection_score_bucket[15m])) / ignoring(le) group_left sum(rate(palm_detection_score_count[15m]))",
                            "<= {{le}}",
                        ),
                    ),
                    "percentunit",
                ),
            ],
        ),
    ]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for title, row_panels in rows():
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        for index, panel in enumerate(row_panels):
            x = (index % 3) * 8
            if index and index % 3 == 0:
                y += 8
            panels.append(
                {
                    "id": next_id,
                    "type": "timeseries",
                    "title": panel.title + (" (GPU only)" if panel.gpu_only else ""),
                    "datasource": DATASOURCE,
                    "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {
                            "refId": chr(ord("A") + i),
                            "datasource": DATASOURCE,
                            "expr": expr,
                            "legendFormat": legend,
                        }
                        for i, (expr, legend) in enumerate(panel.exprs)
                    ],
                }
            )
            next_id += 1
        y += 8
    return {
        "uid": "palm-serve",
        "title": "Palm Serve",
        "tags": ["palm-serve"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def baseline() -> dict[str, dict[str, float]]:
    card = json.loads(CARD.read_text())
    statistics: dict[str, dict[str, float]] = card["input_baseline"]["statistics"]
    return statistics


def rules() -> dict[str, Any]:
    base = baseline()
    recording = [
        {
            "record": "palm:input_channel_mean:mean1h",
            "expr": "sum by (channel) (rate(palm_input_channel_mean_sum[1h]))"
            " / sum by (channel) (rate(palm_input_channel_mean_count[1h]))",
        },
        {
            "record": "palm:input_colourfulness:mean1h",
            "expr": rate_ratio("palm_input_colourfulness_sum", "palm_input_colourfulness_count", "1h"),
        },
        {
            "record": "palm:input_valid_fraction:mean1h",
            "expr": rate_ratio("palm_input_valid_fraction_sum", "palm_input_valid_fraction_count", "1h"),
        },
        {
            "record": "palm:input_gsd_meters:mean1h",
            "expr": rate_ratio("palm_input_gsd_meters_sum", "palm_input_gsd_meters_count", "1h"),
        },
        {
            "record": "palm:input_files:increase1h",
            "expr": "sum(increase(palm_input_colourfulness_count[1h]))",
        },
    ]
    for name, (total, count) in DRIFT_STATISTICS.items():
        reference = base[name]
        spread = max(reference["std"], 1e-6)
        recording.append(
            {
                "record": "palm:input_drift_zscore",
                "expr": f"({rate_ratio(total, count, '1h')} - {reference['mean']}) / {spread}",
                "labels": {"statistic": name},
            }
        )
    gsd = base["gsd_m"]
    alerts = [
        {
            "alert": "PalmModelNotReady",
            "expr": "max(palm_triton_ready) < 1",
            "for": "2m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "Triton does not report the model ready",
                "description": "/readyz fails and predictions answer 503; see the gateway's log and Triton's.",
            },
        },
        {
            "alert": "PalmHighErrorRatio",
            "expr": '1 - sum(rate(palm_http_requests_total{status!~"5.."}[5m])) / sum(rate(palm_http_requests_total[5m])) > 0.05',
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "More than 5% of requests end in a server error (5xx)"},
        },
        {
            "alert": "PalmTritonQueueTime",
            "expr": "sum(rate(nv_inference_queue_duration_us[5m])) / sum(rate(nv_inference_request_success[5m])) / 1e6 > 0.5",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Requests wait more than 0.5 s in Triton's queue: the model is saturated"
            },
        },
        {
            "alert": "PalmJobStalled",
            "expr": "sum(palm_job_files_waiting) > 0 and sum(increase(palm_job_files_total[15m])) == 0",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "Job files are waiting but none was settled in 15 minutes"},
        },
        {
            "alert": "PalmWebhookDeliveriesFailing",
            "expr": 'sum(increase(palm_webhook_deliveries_total{outcome="failed"}[1h])) > 0'
            ' or sum(rate(palm_webhook_attempts_total{outcome!="success"}[15m]))'
            " / sum(rate(palm_webhook_attempts_total[15m])) > 0.5",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Webhook receivers are not taking events",
                "description": (
                    "An event spent every retry in the last hour, or most attempts fail; "
                    "GET /v1/jobs/{id}/webhooks lists each attempt's status code and error."
                ),
            },
        },
        {
            "alert": "PalmInputDrift",
            "expr": f"abs(palm:input_drift_zscore) > {DRIFT_Z} and on() palm:input_files:increase1h >= {DRIFT_MIN_FILES}",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "The model's input has drifted from its validation imagery ({{ $labels.statistic }})",
                "description": (
                    'The 1 h mean of {{ $labels.statistic }} is {{ $value | printf "%.1f" }} baseline '
                    "standard deviations from the model card's input_baseline: grey, saturated, thermal or "
                    "otherwise unfamiliar imagery. Detections may be unreliable."
                ),
            },
        },
        {
            "alert": "PalmGroundSampleDistanceOutOfRange",
            "expr": (
                f"(palm:input_gsd_meters:mean1h < {round(gsd['min'] / 2, 4)} or palm:input_gsd_meters:mean1h > "
                f"{round(gsd['max'] * 2, 4)}) and on() palm:input_files:increase1h >= {DRIFT_MIN_FILES}"
            ),
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Files arrive at a ground sample distance the model was not trained for"
            },
        },
    ]
    return {
        "groups": [
            {"name": "palm-serve-recording", "rules": recording},
            {"name": "palm-serve-alerts", "rules": alerts},
        ]
    }


def expressions() -> list[tuple[str, str, bool]]:
    """``(where, expression, gpu_only)`` for every panel target and every rule."""
    found = [
        (f"panel {panel.title!r}", expr, panel.gpu_only)
        for _, row_panels in rows()
        for panel in row_panels
        for expr, _ in panel.exprs
    ]
    for group in rules()["groups"]:
        for rule in group["rules"]:
            found.append((f"rule {rule.get('record') or rule.get('alert')}", rule["expr"], False))
    return found


def render_yaml(value: Any, indent: int = 0) -> str:
    """A small YAML writer for the rules (plain mappings, lists and scalars; strings JSON-quoted)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{render_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            body = render_yaml(item, indent + 1)
            lines.append(f"{pad}- {body.lstrip()}")
        return "\n".join(lines)
    return f"{pad}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    return str(value)


def outputs() -> dict[Path, str]:
    header = "# Generated by deploy/generate.py from its description and the model card; do not edit.\n"
    return {
        DASHBOARD: json.dumps(dashboard(), indent=2) + "\n",
        RULES: header + render_yaml(rules()) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            "out of date (run python deploy/generate.py): "
            + ", ".join(str(p.relative_to(ROOT)) for p in stale)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
