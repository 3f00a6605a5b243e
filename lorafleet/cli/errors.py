"""The CLI's one rule for bad input: one `error: ...` line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

from typing import Any, NoReturn

import click


class UsageError(click.ClickException):
    """Bad input, worded as one line that names what is wrong and where (`field: problem`).

    Click's own handler prints it, so it behaves the same under `lorafleet`, `python -m lorafleet.cli` and a test's
    `CliRunner`.

    Example:

    ```python
    >>> UsageError("data.path: no such file").exit_code
    2
    ```
    """

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def fail(message: str) -> NoReturn:
    """Refuse the command: `error: <message>` on stderr, exit code 2.

    Args:
        message (`str`): One line naming what is wrong and where.

    Example:

    ```python
    >>> try:
    ...     fail("--wait: needs a Jobs API address")
    ... except UsageError as exc:
    ...     print(exc.message)
    --wait: needs a Jobs API address
    ```
    """
    raise UsageError(message)
