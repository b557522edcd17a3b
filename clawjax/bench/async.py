"""`python -m clawjax.bench async` (the code is in `async_loops.py`; `async` is a keyword, so
this module is only reachable through the dispatcher's importlib)."""

from clawjax.bench.async_loops import main  # noqa: F401
