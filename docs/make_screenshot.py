"""Takes docs/live-page.png: runs the demo, waits, and screenshots the live page in headless
Chromium (Debian's chromium through Playwright's library; no browser download).

    .venv/bin/python docs/make_screenshot.py [seconds before the shot, default 150]
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    wait_s = float(sys.argv[1]) if len(sys.argv) > 1 else 150
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = subprocess.Popen([sys.executable, "-m", "dmrstream", "demo", "--duration", str(wait_s + 30),
                             "--dashboard-port", str(port), "--no-live"], cwd=ROOT)
    try:
        time.sleep(wait_s)
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=shutil.which("chromium"), headless=True,
                viewport={"width": 1400, "height": 1000},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => +document.getElementById('auc-chart').dataset.points > 0")
            time.sleep(2)
            page.screenshot(path=str(ROOT / "docs" / "live-page.png"), full_page=True)
            ctx.close()
    finally:
        demo.wait()


if __name__ == "__main__":
    main()
