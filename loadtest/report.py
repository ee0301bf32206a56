"""A load run as report.html (self-contained: the charts are inlined) plus one PNG per chart."""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from loadtest.driver import Job, LoadRun
from loadtest.scrape import mean_batch_sizes

CHARTS = {
    "latency_over_time.png": "End-to-end latency percentiles over time",
    "latency_histogram.png": "Latency histogram",
    "throughput_over_time.png": "Throughput over time",
    "queue_wait_vs_batch_size.png": "Queue wait vs batch size",
}


def write_report(run: LoadRun, out_dir: Path) -> Path:
    """Write the PNGs and report.html into `out_dir`; returns the HTML's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answered = sorted(
        (j for j in run.jobs if j.latency_s is not None and j.error is None), key=lambda j: j.finished
    )
    start = min((j.sent for j in run.jobs if j.sent is not None), default=0.0)
    plots = (_latency_over_time, _latency_histogram, _throughput_over_time, _queue_wait_vs_batch_size)
    for name, plot in zip(CHARTS, plots, strict=True):
        fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
        plot(ax, answered, start, run)
        ax.set_title(CHARTS[name])
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
    page = out_dir / "report.html"
    page.write_text(_html(run, summary(run), out_dir))
    return page


def summary(run: LoadRun) -> dict[str, str]:
    """The summary table's rows: label -> formatted value."""
    sent = [j for j in run.jobs if j.sent is not None]
    answered = [j for j in sent if j.latency_s is not None and j.error is None]
    latencies = [j.latency_s for j in answered]
    queue = [j.queue_s for j in answered if j.queue_s is not None]
    ttft = [j.ttft_s for j in answered if j.ttft_s is not None]
    tokens = sum(j.output_tokens for j in answered)
    window = max((j.finished for j in answered), default=0) - min((j.sent for j in sent), default=0)
    tokens_per_s = tokens / window if window > 0 else 0.0
    offline = run.offline_tokens_per_s
    rows = {
        "load": run.mode,
        "offered for": f"{run.duration_s:g} s",
        "jobs sent": str(len(sent)),
        "results": str(len(answered)),
        "errors (error results or no result)": str(len(run.jobs) - len(answered)),
        "end-to-end latency p50 / p95 / p99": _percentiles(latencies),
        "queue wait p50 / p95 / p99": _percentiles(queue),
        "time to first token p50 / p95 / p99": _percentiles(ttft),
        "output tokens/s (first job sent to last result)": f"{tokens_per_s:.1f}",
        "engine offline on the same jobs, output tokens/s": "not measured"
        if offline is None
        else f"{offline:.1f}",
        "service / engine throughput": "not measured" if not offline else f"{tokens_per_s / offline:.2f}",
    }
    return rows


def _percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a" if not values else f"{values[0]:.3f} s (one job)"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49]:.3f} / {q[94]:.3f} / {q[98]:.3f} s"


def _windows(answered: list[Job], start: float) -> tuple[float, list[list[Job]]]:
    """Jobs grouped by when their result came, in ~30 equal windows."""
    if not answered:
        return 1.0, []
    span = max(j.finished for j in answered) - start
    width = max(span / 30, 0.5)
    buckets: list[list[Job]] = [[] for _ in range(int(span / width) + 1)]
    for j in answered:
        buckets[min(int((j.finished - start) / width), len(buckets) - 1)].append(j)
    return width, buckets


def _latency_over_time(ax, answered: list[Job], start: float, run: LoadRun) -> None:
    width, buckets = _windows(answered, start)
    for q, label in ((50, "p50"), (95, "p95"), (99, "p99")):
        xs, ys = [], []
        for i, bucket in enumerate(buckets):
            if bucket:
                xs.append((i + 0.5) * width)
                ys.append(_quantile([j.latency_s for j in bucket], q))
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("seconds since the first job")
    ax.set_ylabel("latency (s)")
    ax.legend()


def _latency_histogram(ax, answered: list[Job], start: float, run: LoadRun) -> None:
    ax.hist([j.latency_s for j in answered], bins=30, alpha=0.8, label="end to end")
    queue = [j.queue_s for j in answered if j.queue_s is not None]
    if queue:
        ax.hist(queue, bins=30, alpha=0.6, label="queue wait")
    ax.set_xlabel("seconds")
    ax.set_ylabel("jobs")
    ax.legend()


def _throughput_over_time(ax, answered: list[Job], start: float, run: LoadRun) -> None:
    width, buckets = _windows(answered, start)
    xs = [(i + 0.5) * width for i in range(len(buckets))]
    ax.plot(
        xs, [sum(j.output_tokens for j in b) / width for b in buckets], color="C0", label="output tokens/s"
    )
    ax.set_xlabel("seconds since the first job")
    ax.set_ylabel("output tokens/s")
    jobs_axis = ax.twinx()
    jobs_axis.plot(xs, [len(b) / width for b in buckets], color="C1", label="jobs/s")
    jobs_axis.set_ylabel("jobs/s")
    ax.legend(handles=ax.get_lines() + jobs_axis.get_lines(), loc="upper left")


def _queue_wait_vs_batch_size(ax, answered: list[Job], start: float, run: LoadRun) -> None:
    """Each job's queue wait against the engine's mean batch size when it was admitted."""
    spans = mean_batch_sizes(run.samples)
    xs, ys = [], []
    for j in answered:
        if j.queue_s is None:
            continue
        admitted = j.sent + j.queue_s
        size = next((s for a, b, s in spans if a <= admitted < b), None)
        if size is not None:
            xs.append(size)
            ys.append(j.queue_s)
    ax.scatter(xs, ys, s=12, alpha=0.7, color="C2")
    ax.set_xlabel("mean sequences per engine step when admitted (from /metrics)")
    ax.set_ylabel("queue wait (s)")
    if not xs:
        ax.text(0.5, 0.5, "no /metrics samples", transform=ax.transAxes, ha="center")


def _quantile(values: list[float], q: int) -> float:
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _html(run: LoadRun, rows: dict[str, str], out_dir: Path) -> str:
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items())
    figures = "\n".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((out_dir / name).read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for name, title in CHARTS.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sluice load test: {html.escape(run.mode)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f4f4f4; font-weight: normal; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(640px, 1fr)); gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Sluice load test</h1>
<p>Latency is from a job record's timestamp to its result record's timestamp; queue wait and time
to first token are the service's own timings (the result's <code>body.sluice</code>). The
service/engine ratio compares the service's output tokens/s over the run with the engine alone on
the same jobs, measured after the run in the same process; an open-loop run below the service's
capacity shows the offered load, not the capacity.</p>
<table>
{table}
</table>
<div class="charts">
{figures}
</div>
</body></html>
"""
