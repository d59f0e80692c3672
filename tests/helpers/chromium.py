"""Headless Chromium (Debian's ``chromium``, installed by ``agora_cli.py test``): a page's DOM after its
scripts ran, a screenshot, and a reader for the dashboard's charts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest


def _chromium(args: list[str], profile_dir: Path, timeout: float = 120) -> tuple[int, str, str]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `apt-get install chromium` (agora_cli.py test installs it)")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile_dir}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # browser helpers share its process group: take them all down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def rendered_dom(url: str, profile_dir: Path, budget_ms: int = 8000) -> str:
    code, out, err = _chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], profile_dir)
    assert code == 0 and "</html>" in out, f"chromium failed ({code}): {err[-2000:]}"
    return out


def screenshot(url: str, path: Path, profile_dir: Path, size: tuple[int, int] = (1280, 1900), budget_ms: int = 8000) -> Path:
    code, _, err = _chromium([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
                              f"--screenshot={path}", url], profile_dir)
    assert code == 0 and path.exists(), f"chromium failed ({code}): {err[-2000:]}"
    return path


class ChartReader(HTMLParser):
    """The dashboard's charts as drawn: ``charts[name][series] == number of points``."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict[str, int]] = {}
        self._chart: str | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "data-chart" in attrs:
            self._chart, self._depth = attrs["data-chart"], 0
            self.charts[self._chart] = {}
        elif self._chart is not None:
            if tag == "svg":
                self._depth += 1
            if tag == "g" and "data-series" in attrs:
                self.charts[self._chart][attrs["data-series"]] = int(attrs.get("data-points", 0))

    def handle_endtag(self, tag):
        if tag == "svg" and self._chart is not None:
            if self._depth:
                self._depth -= 1
            else:
                self._chart = None

    def with_data(self) -> dict[str, dict[str, int]]:
        return {name: series for name, series in self.charts.items() if any(series.values())}


def charts_in(dom: str) -> ChartReader:
    reader = ChartReader()
    reader.feed(dom)
    return reader
