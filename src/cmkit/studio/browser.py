"""A headless Chromium for driving the studio page (the browser tests and bench/studio.py).

Debian's ``chromium`` package, driven by Playwright with the system browser as its executable (Playwright's
own browser download is not needed), with the flags that keep it off the network.
"""

from __future__ import annotations

import shutil
from typing import Any

from cmkit.errors import CmkitError

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str:
    """The system Chromium; CmkitError saying how to install it when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise CmkitError("no chromium on PATH: apt-get install chromium")
    return path


def launch(playwright: Any) -> Any:
    """A headless Chromium ``Browser`` from a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=list(FLAGS))
