"""README.md stays the user's guide: its config reference lists every key of
`clawjax.config.base_config()` with the current default, and its benchmark list names every
`python -m clawjax.bench NAME`.

Regenerate the reference after adding a key (descriptions come from the key's comment in
`clawjax/config.py`, else the README's current text for that key):

    python tests/test_readme.py --write
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CONFIG_PY = os.path.join(ROOT, "clawjax", "config.py")
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
ROW = re.compile(r"^\| `([\w.]+)` \| (.*?) \| (.*) \|$")


def format_default(value) -> str:
    """How a default reads in the table (inside backticks)."""
    from clawjax.config import TINY_QWEN3

    if isinstance(value, dict):
        return "`TINY_QWEN3`" if value == TINY_QWEN3 else f"`{json.dumps(value)}`"
    if isinstance(value, str):
        return f"`{json.dumps(value)}`"
    return f"`{value!r}`"


def config_keys() -> list[tuple[str, object, str]]:
    """`(key, default, comment)` for every leaf key of `base_config()`, in source order; the
    comment is the one on the key's line in clawjax/config.py ("" when there is none)."""
    sys.path.insert(0, ROOT)
    from clawjax.config import base_config

    with open(CONFIG_PY) as f:
        source = f.read()
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    func = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "base_config")
    order = [(node.lineno, ast.unparse(node.targets[0]).removeprefix("c."))
             for node in ast.walk(func)
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)]
    assigned = {key for _, key in order}
    flat = {}

    def walk(prefix, d):
        for k in d.keys():
            v = d[k]
            if hasattr(v, "keys") and any(a.startswith(f"{prefix}{k}.") for a in assigned):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v.to_dict() if hasattr(v, "to_dict") else v

    walk("", base_config())
    order = [(line, key) for line, key in order if key in flat]
    rows = [(key, flat[key], comments.get(line, "")) for line, key in sorted(order)]
    assert {r[0] for r in rows} == set(flat), set(flat) - {r[0] for r in rows}
    return rows


def readme_reference(text: str) -> dict[str, tuple[str, str]]:
    """`key -> (default, description)` from the README's config reference table."""
    body = text.split(START, 1)[1].split(END, 1)[0]
    return {m[1]: (m[2], m[3]) for m in map(ROW.match, body.splitlines()) if m}


def render(previous: dict[str, tuple[str, str]]) -> str:
    lines = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, comment in config_keys():
        description = comment.replace("|", "\\|") if comment else \
            previous.get(key, ("", ""))[1] or "TODO: describe"
        lines.append(f"| `{key}` | {format_default(default)} | {description} |")
    return "\n".join(lines)


def _readme() -> str:
    with open(README) as f:
        return f.read()


def test_config_reference_lists_every_key_with_its_default():
    listed = readme_reference(_readme())
    keys = config_keys()
    missing = [k for k, _, _ in keys if k not in listed]
    stale = sorted(set(listed) - {k for k, _, _ in keys})
    assert not missing and not stale, (
        f"README config reference: missing {missing}, stale {stale}; "
        f"run `python tests/test_readme.py --write`")
    for key, default, _ in keys:
        assert listed[key][0] == format_default(default), (key, listed[key][0])
        text = listed[key][1].strip()
        assert text and "TODO" not in text, f"README: describe config key {key!r}"


def test_benchmarks_are_all_listed():
    """The Benchmarks table's NAME column is exactly what `python -m clawjax.bench` runs."""
    from clawjax.bench.__main__ import available

    readme = _readme()
    table = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert sorted(listed) == sorted(available()), (
        f"README's Benchmarks table lists {sorted(listed)}; the command runs {available()}")
    assert "python -m clawjax.bench NAME" in readme


def test_quickstart_and_guide_sections():
    readme = _readme()
    first = readme.split("\n## ", 2)[1]  # the first section after the title
    assert "pip install -e . && python -m clawjax.train" in first
    assert 'pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadfile tests' in first
    for needle in ("<!-- default-run-figures -->", "launch/sglang_fleet.sh",
                   "configs/qwen3_4b_combine.py", "--config.publish.urls",
                   "--config.buffer.address", "python -m clawjax.buffer serve",
                   "python -m clawjax.rollout serve", "launch/tpu_pod.sh",
                   "launch/gpu_multihost.sh", "from clawjax import losses",
                   "launch/colab_quickstart.ipynb"):
        assert needle in readme, needle


def test_readme_loss_example_runs():
    """The loss-library example in the README runs as written."""
    readme = _readme()
    block = readme.split("## The loss library in other JAX projects", 1)[1]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "loss" in namespace


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = _readme()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        table = render(readme_reference(text))
        with open(README, "w") as f:
            f.write(f"{head}{START}\n{table}\n{END}{tail}")
    else:
        print(render({}))
