"""Running a script in every rank of a real gloo process group (one Python process per rank)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.net import free_port

_PRELUDE = """
import os
import torch.distributed as dist
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
"""


def run_in_process_group(script: str, world_size: int = 2, args: tuple[str, ...] = (),
                         timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Run `script` in `world_size` processes after each joined one gloo group (`RANK` in its environment).

    Args:
        script (`str`): Python source; the group is initialized before it runs.
        world_size (`int`, *optional*, defaults to 2): How many ranks.
        args (`tuple[str, ...]`, *optional*): Its `sys.argv[1:]`, the same in every rank.
        timeout (`float`, *optional*, defaults to 180): Seconds before the ranks still running are killed.

    Returns:
        `list[subprocess.CompletedProcess]`: One per rank, in rank order (text output captured).
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    procs = [
        subprocess.Popen([sys.executable, "-c", _PRELUDE + script, *args], env=dict(env, RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(world_size)
    ]
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results
