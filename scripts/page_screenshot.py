"""Screenshot of the scoring page of a running `aivoice serve`, with one clip scored, in headless Chromium.

    python scripts/page_screenshot.py --url http://127.0.0.1:8000 --clip some.wav --out docs/img/scoring-page.png

Needs Debian's chromium + chromium-driver and selenium (the dev extra), as the page's browser test does.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clip", required=True, type=Path, help="audio file to upload through the page")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--size", default="1100,900", help="window size in pixels (w,h)")
    args = ap.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        print("chromium and chromedriver not found (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 1
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    try:
        driver.get(args.url.rstrip("/") + "/")
        driver.find_element(By.ID, "file-input").send_keys(str(args.clip.resolve()))
        deadline = time.monotonic() + 180
        while not (driver.find_element(By.ID, "result").is_displayed() or driver.find_element(By.ID, "error").is_displayed()):
            if time.monotonic() > deadline:
                print(f"{args.clip}: no result on the page after 180 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        time.sleep(1.0)   # let the timeline finish drawing
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
