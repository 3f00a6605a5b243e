"""What a command shows on the console: lorafleet's own lines, and the libraries' chatter only with `--verbose`.

Without `--verbose`, stderr holds only lorafleet's lines (`lorafleet: ...`, `error: ...`, the progress view) and
stdout only results. The libraries under a command talk a lot, and each source is switched off here, once, before the
command imports them:

- transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model shards"):
  `HF_HUB_DISABLE_PROGRESS_BARS=1`, read when huggingface_hub is imported;
- transformers' log messages below errors: `TRANSFORMERS_VERBOSITY=error`, read when transformers is imported;
- Python warnings from the libraries (transformers' and PEFT's FutureWarnings about their own deprecations, which a
  user cannot act on): not shown; a warning lorafleet itself defines still shows, as `lorafleet: warning: ...`;
- Ray's token-authentication banner, logged on the driver when `ray.init` starts a local instance.

An environment variable the user has set keeps its value; those set here also reach a local run's Ray workers.
DeepSpeed needs no silencing: it is imported only by the workers of a `scaling.strategy: deepspeed` job
([`lorafleet.compat.accelerate`]). lorafleet's own log records print as `lorafleet: <message>` in both modes.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional, TextIO

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


# Loggers whose warnings are routine on a console: Ray's note that token authentication is on (the default since
# Ray 2.52) says nothing a lorafleet user must act on; bitsandbytes, on a CPU with AVX-512 bf16, reports at import
# that it could not fetch an optional CPU kernel from the Hub (the `kernels` package), and falls back to its own.
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup", "bitsandbytes.backends.cpu.ops")


PREFIX = "lorafleet: "


HANDLER = "lorafleet-console"


def _own_line(record: Any) -> bool:
    """Prefix a lorafleet log record as its other console lines are (`lorafleet: ...`), once."""
    if not str(record.msg).startswith(PREFIX):
        record.msg = PREFIX + str(record.msg)
    return True


def _show_own_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Optional[TextIO] = None,
    line: Optional[str] = None,
) -> None:
    if category.__module__.split(".")[0] == "lorafleet":
        print(f"{PREFIX}warning: {message}", file=file or sys.stderr, flush=True)


def configure_console(verbose: bool = False) -> None:
    """Set up the console for a command that is about to import the heavy libraries.

    Args:
        verbose (`bool`, *optional*, defaults to `False`):
            Show everything the libraries print (and lorafleet's info lines); otherwise only lorafleet's own lines.

    Example:

    ```python
    >>> configure_console(verbose=False)  # doctest: +SKIP
    >>> import transformers  # doctest: +SKIP
    ```
    """
    # Deferred: `logging` is ~10% of `lorafleet --help`, and only the commands that run something configure the console.
    import logging

    own = logging.getLogger("lorafleet")
    if not any(h.get_name() == HANDLER for h in own.handlers):
        handler = logging.StreamHandler()
        handler.set_name(HANDLER)
        handler.addFilter(_own_line)
        own.addHandler(handler)
        # Shown once, here, whatever handlers a library gives the root logger.
        own.propagate = False
    own.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.showwarning = _show_own_warning

