"""`python -m loadtest`: open- and closed-loop load against a running service, and a report whose
charts really render (report.html opened in headless Chromium, the screenshot checked)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from engine import EngineConfig
from loadtest.__main__ import main as loadtest_main
from loadtest.driver import JobShape, Target, run_load
from loadtest.offline import offline_tokens_per_s
from loadtest.report import CHARTS, summary, write_report
from tests.browser import chromium
from tests.service.conftest import kafka, run_service, service_config, tiny_engine  # noqa: F401 (fixtures)

MATPLOTLIB_BLUE, MATPLOTLIB_ORANGE = (31, 119, 180), (255, 127, 14)  # the charts' first two colours


def screenshot(page: Path, out: Path, timeout_s: float = 120) -> Image.Image:
    chromium(page.as_uri(), "--window-size=1400,1600", f"--screenshot={out}", timeout=timeout_s)
    assert out.is_file(), f"Chromium wrote no screenshot of {page.name}"
    return Image.open(out).convert("RGB")


def count_near(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return sum(
        n
        for n, rgb in image.getcolors(maxcolors=1 << 24)
        if all(abs(a - b) <= tolerance for a, b in zip(rgb, colour, strict=True))
    )


def non_white_share(image: Image.Image) -> float:
    pixels = image.width * image.height
    return sum(n for n, rgb in image.getcolors(maxcolors=1 << 24) if min(rgb) < 235) / pixels


@pytest.mark.kafka
@pytest.mark.slow
async def test_open_and_closed_loop_runs_write_a_report_whose_charts_render_in_chromium(
    service_config,  # noqa: F811
    run_service,  # noqa: F811
    tiny_checkpoint,
    tmp_path,
):
    vocab_size = json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"]
    shape = JobShape(vocab_size, prompt_tokens=(8, 32), output_tokens=(4, 12), seed=1)
    async with run_service(service_config) as service:
        target = Target(
            service_config.kafka_bootstrap,
            service_config.jobs_topics[0],
            service_config.results_topic,
            f"http://127.0.0.1:{service.http.port}/metrics",
        )
        closed = await run_load(target, shape, duration_s=1.5, concurrency=2, drain_timeout_s=60)
        run = await run_load(target, shape, duration_s=4, rate=6, drain_timeout_s=60)

    for load in (closed, run):
        assert load.jobs and all(j.error is None and j.latency_s > 0 for j in load.jobs)
        assert all(j.output_tokens == j.max_tokens for j in load.jobs)  # greedy, EOS ignored
        assert all(0 <= j.queue_s <= j.latency_s for j in load.jobs)
    assert closed.mode == "closed loop, 2 jobs in flight" and "open loop, 6 jobs/s" in run.mode
    assert len(run.samples) >= 4  # /metrics was sampled during the run

    sent = [j for j in run.jobs if j.sent is not None]
    engine_config = EngineConfig(
        dtype="float32", model=str(tiny_checkpoint), max_model_len=256, kv_cache_memory_gib=0.25
    )
    run.offline_tokens_per_s = offline_tokens_per_s(engine_config, sent)
    rows = summary(run)
    assert rows["jobs sent"] == rows["results"] == str(len(run.jobs))
    assert rows["errors (error results or no result)"] == "0"
    assert re.fullmatch(r"[\d.]+ / [\d.]+ / [\d.]+ s", rows["end-to-end latency p50 / p95 / p99"])
    assert float(rows["service / engine throughput"]) > 0

    page = write_report(run, tmp_path / "report")
    for name in CHARTS:
        assert (tmp_path / "report" / name).stat().st_size > 10_000, name
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == len(CHARTS)  # self-contained
    assert 'src="http' not in text and "<script" not in text

    shot = screenshot(page, tmp_path / "report.png")
    assert non_white_share(shot) > 0.02  # charts and table, not an empty page
    assert count_near(shot, MATPLOTLIB_BLUE) > 500  # the plotted lines, bars and points
    assert count_near(shot, MATPLOTLIB_ORANGE) > 150

    # The same page without its images: the colour check finds no chart, so it does see the charts above.
    blank = tmp_path / "no-charts.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', text))
    assert count_near(screenshot(blank, tmp_path / "no-charts.png"), MATPLOTLIB_BLUE) < 50


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--rate", "0", "--duration", "5"], "--rate must be > 0"),
        (["run", "--concurrency", "2", "--duration", "0"], "--duration must be > 0"),
        (["run", "--rate", "1", "--duration", "5", "--prompt-tokens", "9-3"], "bad range '9-3'"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(args, message, capsys):
    assert loadtest_main(args) == 2
    assert message in capsys.readouterr().err


def test_rate_and_concurrency_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        loadtest_main(["run", "--rate", "1", "--concurrency", "2", "--duration", "5"])
    assert "not allowed with argument" in capsys.readouterr().err
