"""deploy/prometheus/rules.yml under promtool's rule unit tests: each alert fires on the series
that mean trouble and stays quiet on the ones that do not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


def _firing(alert: str, **labels: str) -> dict:
    return {"labels": f"ALERTS{{{_labels(alertname=alert, alertstate='firing', **labels)}}}", "value": 1}


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def test_an_open_transaction_alert_fires_only_where_the_last_stable_offset_stood_still(tmp_path):
    stuck = _labels(instance="a", topic="jobs", partition="0")  # 2 records held back, LSO still
    busy = _labels(instance="a", topic="jobs", partition="1")  # transactions come and go, LSO moves
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"sluice_jobs_open_transaction_records{{{stuck}}}", "values": "0 2x20"},
                    {"series": f"sluice_jobs_last_stable_offset{{{stuck}}}", "values": "5x20"},
                    {"series": f"sluice_jobs_open_transaction_records{{{busy}}}", "values": "3x20"},
                    {"series": f"sluice_jobs_last_stable_offset{{{busy}}}", "values": "0+4x20"},
                ],
                "promql_expr_test": [
                    # the gap opened at 1m: held back for 5 minutes at 6m, then `for: 2m`
                    {
                        "expr": 'ALERTS{alertname="SluiceJobsTransactionOpen"}',
                        "eval_time": "5m",
                        "exp_samples": [],
                    },
                    {
                        "expr": 'ALERTS{alertname="SluiceJobsTransactionOpen",alertstate="firing"}',
                        "eval_time": "7m",
                        "exp_samples": [],
                    },
                    {
                        "expr": 'ALERTS{alertname="SluiceJobsTransactionOpen",alertstate="firing"}',
                        "eval_time": "8m",
                        "exp_samples": [
                            _firing(
                                "SluiceJobsTransactionOpen", partition="0", severity="warning", topic="jobs"
                            )
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
