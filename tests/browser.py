"""Headless Chromium (`make browser` installs it) for the tests that check a page really renders."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import pytest


def chromium(url: str, *flags: str, timeout: float = 120) -> str:
    """Chromium on the page with `flags` (--screenshot=..., --dump-dom, --window-size=...): its
    stdout. A profile of its own (a shared one can make a second Chromium wait for the first) and
    a process group of its own: on a timeout the whole browser is killed, helpers too."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: `make browser` installs it (Debian package chromium)"
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",  # the tests may run as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *flags,
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            stderr.seek(0)
            pytest.fail(f"Chromium took over {timeout:.0f}s on {url}: {stderr.read()[-2000:]}")
        stderr.seek(0)
        assert process.returncode == 0, stderr.read()[-2000:]
    return out
