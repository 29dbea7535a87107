"""The review's numbers as CloudWatch metrics, so an alarm can start retraining.

Per model version (dimensions ``Model`` and ``Version``), at the end of the review's range:
``feature_baseline_drift_<feature>`` (the fleet's KS distance to the baseline, Model Monitor's
metric name), ``score_baseline_drift`` (the outlier score's), ``outlier_rate``, ``rejected_rate``,
and ``devices_<verdict>`` counts.
"""

from __future__ import annotations

import math
from collections import Counter

from .drift import SCORE_ROW, SEVERITY, ModelDrift

BATCH = 150  # PutMetricData takes up to 1,000 metrics and 1 MB a call


def metric_data(report: ModelDrift) -> list[dict]:
    dims = [{"Name": "Model", "Value": report.model_name}, {"Name": "Version", "Value": report.model_version}]
    when = report.until
    data = []

    def put(name: str, value: float | None, unit: str = "None") -> None:
        if value is not None and math.isfinite(value):
            data.append({"MetricName": name, "Dimensions": dims, "Value": float(value), "Unit": unit,
                         **({"Timestamp": when} if when else {})})

    fleet = report.fleet
    if fleet:
        for f in fleet.features:
            put("score_baseline_drift" if f.feature == SCORE_ROW else f"feature_baseline_drift_{f.feature}", f.ks)
        put("outlier_rate", fleet.outlier_rate)
        seen = fleet.records + fleet.rejected
        put("rejected_rate", fleet.rejected / seen if seen else 0.0)
    counts = Counter(d.verdict for d in report.devices)
    for verdict in SEVERITY:
        put(f"devices_{verdict.replace('-', '_')}", counts.get(verdict, 0), "Count")
    return data


def publish(reports: list[ModelDrift], client, namespace: str = "edgeloop/drift") -> int:
    """``put_metric_data`` in batches; returns how many metrics were sent."""
    sent = 0
    for report in reports:
        data = metric_data(report)
        for i in range(0, len(data), BATCH):
            client.put_metric_data(Namespace=namespace, MetricData=data[i:i + BATCH])
        sent += len(data)
    return sent
