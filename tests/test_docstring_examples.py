"""Every docstring example in `lorafleet/` runs and prints what it says it prints.

Examples sit in ```python fences (the PEFT/HF convention); the fences are stripped and the rest is run as a doctest in
the namespace of the module that holds it, from the repository root. Lines marked `# doctest: +SKIP` (examples that
need a GPU, a cluster or a bucket) are not run; examples that run a whole job are marked slow.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re

import pytest

import lorafleet
from helpers.cli import REPO

FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _runnable(block: str) -> bool:
    """Whether some line of the example runs (not every line is marked `+SKIP`)."""
    examples = doctest.DocTestParser().get_examples(block)
    return any(not example.options.get(doctest.SKIP) for example in examples)


def _examples():
    for info in pkgutil.walk_packages(lorafleet.__path__, "lorafleet."):
        if info.name.endswith("__main__"):
            continue  # running the command is its only content
        module = importlib.import_module(info.name)
        objects = [module, *(obj for _, obj in inspect.getmembers(module) if getattr(obj, "__module__", None) == module.__name__)]
        for obj in list(objects):
            if inspect.isclass(obj):
                objects += [member for member in vars(obj).values() if inspect.isfunction(member)]
        seen = set()
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for number, block in enumerate(FENCE.findall(doc)):
                name = f"{module.__name__}.{getattr(obj, '__qualname__', '')}[{number}]".replace(".[", "[")
                if _runnable(block) and name not in seen:
                    seen.add(name)
                    marks = [pytest.mark.slow] if "run_job(" in block else []
                    yield pytest.param(module, block, id=name, marks=marks)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its accelerator choice to stdout the first time it is asked (inside whichever example first
    builds a model); ask it here so that line is not taken for the example's output."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return
    get_accelerator()


@pytest.fixture
def leaves_no_ray_behind():
    """An example that runs a job starts Ray in this process, and Ray sets variables such as `RAY_AUTH_MODE=token` in
    its environment: later tests that start their own clusters must see neither."""
    environ = dict(os.environ)
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("module, block", list(_examples()))
def test_docstring_example_runs(module, block, monkeypatch, leaves_no_ray_behind):
    monkeypatch.chdir(REPO)  # examples name the shipped files (jobs/...) the way a user in a checkout would
    _quiet_deepspeed()
    test = doctest.DocTestParser().get_doctest(block, dict(vars(module)), module.__name__, module.__file__, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
