"""Dispatch `python -m clawjax.bench NAME [ARGS...]` to `clawjax.bench.NAME.main(ARGS)`."""

import importlib
import pkgutil
import sys

import clawjax.bench


# Modules of the package that are not benchmarks of their own: shared helpers, and the code of
# `async` (a keyword, so its module only re-exports `async_loops.main`).
NOT_BENCHMARKS = ("common", "async_loops")


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(clawjax.bench.__path__)
                  if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS)


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m clawjax.bench NAME [ARGS...]\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"unknown benchmark {name!r}; expected one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"clawjax.bench.{name}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
