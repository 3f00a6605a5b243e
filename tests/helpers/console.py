"""What counts as lorafleet's own console output, for the tests that keep the libraries' chatter off it."""

from __future__ import annotations

import re

# `lorafleet: ...` notes, `error: ...` refusals and the progress view's plain lines (`[job] step 3/10  loss ...`).
OWN_LINE = re.compile(r"^(lorafleet: |error: |\[[A-Za-z0-9_.-]+\] step \d+/\d+ )")


def foreign_lines(stderr: str) -> list[str]:
    """The non-empty lines of `stderr` that lorafleet did not write (a library's warning, banner or progress bar)."""
    return [line for line in stderr.splitlines() if line.strip() and not OWN_LINE.match(line)]
