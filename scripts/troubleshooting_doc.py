#!/usr/bin/env python3
"""Write docs/troubleshooting.md from the table of known errors (agora/src/agora/cli/troubleshooting.py).

Run it after changing the table (inside .venv, or as `.venv/bin/python scripts/troubleshooting_doc.py`);
tests/cli/test_troubleshooting.py fails while the page and the table differ. The agent skill's table
takes the same rows: `--rows` prints them for pasting.
"""

import sys
from pathlib import Path

from agora.cli.troubleshooting import markdown_rows, troubleshooting_page

PAGE = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"

if __name__ == "__main__":
    if sys.argv[1:] == ["--rows"]:
        print(markdown_rows())
    else:
        PAGE.write_text(troubleshooting_page(), encoding="utf-8")
        print(f"wrote {PAGE}")
