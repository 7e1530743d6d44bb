"""The example notebook (examples/echo/notebook.ipynb) runs as a user would run it: in a Jupyter kernel, cell by
cell (nbclient), submitting the example job from Python, watching it and reading its output into pandas."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from support.jobs import ROOT

NOTEBOOK = ROOT / "examples" / "echo" / "notebook.ipynb"


def test_the_notebook_is_kept_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "strip the notebook's outputs"


@pytest.mark.integration
def test_the_example_notebook_submits_watches_and_reads_the_output(tmp_path: Path, prefect_api: str,
                                                                   slurmctl_home: Path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # A copy of the example's folder, so its store (../../.slurmctl from the config) is under tmp_path
    work = tmp_path / "examples" / "echo"
    shutil.copytree(NOTEBOOK.parent, work, ignore=shutil.ignore_patterns("users.jsonl", "__pycache__"))
    # The kernel is this environment's Python (its kernel spec runs `python`), as a notebook opened in it would be
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    nb = nbformat.read(work / "notebook.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for out in outputs.values() for o in out)
    assert "'status': 'completed'" in text and "'items_succeeded': 2000" in text and "'items_rejected': 1" in text, text
    assert "user-0" in text  # df.head()
    [waited] = [c.outputs for c in nb.cells if "job.wait(" in c.source]
    progress = "".join(o.get("text", "") for o in waited if o.get("output_type") == "stream")
    assert progress.rstrip("\n").rsplit("\r", 1)[-1].count("100.0% done"), progress  # one line, rewritten
    assert (tmp_path / ".slurmctl" / "jobs").is_dir()  # the example's own store, next to the copy
