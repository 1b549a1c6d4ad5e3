"""Every notebook runs top to bottom in a fresh kernel (tiny settings) and is committed clean."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_are_there():
  assert [p.name for p in NOTEBOOKS] == ["01_routing_tour.ipynb", "02_expert_specialization.ipynb",
                                         "03_balancing_ablation.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  """One tiny run shared by the notebooks that train (the first trains it, the next reuses it)."""
  return tmp_path_factory.mktemp("notebooks") / "run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, notebook_run, monkeypatch):
  monkeypatch.setenv("MOE_JAX_NOTEBOOK_RUN", str(notebook_run))
  monkeypatch.setenv("MOE_JAX_NOTEBOOK_STEPS", "40")
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}})
  client.execute()   # raises CellExecutionError, with the cell and its traceback, on any error
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3, "plots did not render inline"
