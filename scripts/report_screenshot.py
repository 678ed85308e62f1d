"""Screenshots of a run report, taken in headless Chromium with the network off (for the README).

    .venv/bin/python scripts/report_screenshot.py runs/regex-world/report.html docs/report.png \
        [--choice "set=regex&prompt=3&sample=0"] [--scale 0.6] [--front-only] [--hide constant ...]

Writes OUT (header, summary and charts) and OUT with ``_side_by_side`` before the suffix (the
completions of the chosen prompt and sample). Needs chromium, chromedriver and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
from pathlib import Path


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        sys.exit("error: chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.emulateNetworkConditions",
                      {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    return d


def _shot(d, top: float, bottom: float, width: int, scale: float, out: Path) -> None:
    clip = {"x": 0, "y": top, "width": width, "height": bottom - top, "scale": scale}
    png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
    out.write_bytes(base64.b64decode(png["data"]))
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--choice", default="", help="the side by side's choice, as in the page's URL (set=...&prompt=...)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--scale", type=float, default=0.6)
    p.add_argument("--cards", type=int, default=9, help="cards of the side by side to show")
    p.add_argument("--front-only", action="store_true", help="the summary's Pareto-front rows only")
    p.add_argument("--hide", nargs="*", default=[], metavar="FAMILY", help="families left out of the side by side")
    args = p.parse_args(argv)
    from selenium.webdriver.support.ui import WebDriverWait

    d = _driver()
    try:
        d.set_window_size(args.width, 1200)
        d.get(args.report.resolve().as_uri() + (f"#{args.choice}" if args.choice else ""))
        WebDriverWait(d, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        WebDriverWait(d, 60).until(lambda d: d.execute_script("return !!document.querySelector('#chart-pareto svg')"))
        d.execute_script("""
            if (arguments[0]) document.getElementById('front-only').click();
            for (const label of document.querySelectorAll('#family-filter label')) {
                if (arguments[1].includes(label.textContent.trim())) label.querySelector('input').click();
            }""", args.front_only, args.hide)
        box = d.execute_script("""
            const y = (sel, end) => { const r = document.querySelector(sel).getBoundingClientRect();
                                      return (end ? r.bottom : r.top) + window.scrollY; };
            const cards = [...document.querySelectorAll('#cards .card')];
            const last = cards[Math.min(cards.length, arguments[0]) - 1];
            return {chartEnd: y('#chart-pareto', true) + 8,
                    sideTop: y('#chart-pareto', true) + 12,
                    sideEnd: last ? last.getBoundingClientRect().bottom + window.scrollY + 8 : y('#cards', true)};
        """, args.cards)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _shot(d, 0, box["chartEnd"], args.width, args.scale, args.out)
        side = args.out.with_name(args.out.stem + "_side_by_side" + args.out.suffix)
        _shot(d, box["sideTop"], box["sideEnd"], args.width, args.scale, side)
    finally:
        d.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
