"""launch/colab_quickstart.ipynb executes top to bottom (nbclient, a real Jupyter kernel) with a
reduced step count and produces its learning-curve plot; the plotted run learned something."""

from __future__ import annotations

import json
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel")
nbclient = pytest.importorskip("nbclient", reason="pip install nbformat nbclient ipykernel")
pytest.importorskip("matplotlib", reason="pip install matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_quickstart.ipynb")
STEPS = 8


def _with_parameters(nb, **values):
    """Replaces the source of the cell tagged `parameters` (papermill's convention)."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line}
    assert set(values) <= names, f"unknown parameters {set(values) - names}"
    cells[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


def test_notebook_runs_and_plots(tmp_path, monkeypatch):
    # The kernel inherits this environment: one CPU device like Colab's CPU runtime.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), STEPS=STEPS,
                          WORKDIR=str(tmp_path / "run"))
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"notebook executed in {time.perf_counter() - start:.1f} s ({STEPS} steps)")

    curve = tmp_path / "run" / "learning_curve.png"
    assert curve.exists() and curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert shown, "the plot is displayed in the notebook too"
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    print("held-out log-prob per step:", [round(r["heldout_logp"], 3) for r in records])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Binary RL on the preferred answer raises its held-out log-prob.
    assert records[-1]["heldout_logp"] > records[0]["heldout_logp"] + 0.5
