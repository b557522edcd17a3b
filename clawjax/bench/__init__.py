"""`python -m clawjax.bench NAME`: side-by-side benchmarks.

Each benchmark is a module `clawjax/bench/NAME.py` with a `main(argv: list[str]) -> int` that
measures the thing and a baseline in the same process and prints both plus their ratio (these
machines are noisy; absolute times mean little, ratios do).
"""
