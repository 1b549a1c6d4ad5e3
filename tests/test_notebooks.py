"""Every notebook runs top to bottom in a fresh kernel (tiny settings) and is committed clean;
its setup cell and Colab badge name the repository and release setup.cfg names."""

import configparser
import re

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_and_badge_name_the_packages_address_and_release(path):
  metadata = configparser.ConfigParser()
  metadata.read(ROOT / "setup.cfg")
  url, version = metadata["metadata"]["url"], metadata["metadata"]["version"]
  cells = nbformat.read(path, as_version=4).cells
  setup = cells[1].source
  assert re.search(r'^REPOSITORY = "([^"]+)"', setup, re.M).group(1) == url
  assert re.search(r'^RELEASE = "([^"]+)"', setup, re.M).group(1) == f"v{version}"
  badge = f"https://colab.research.google.com/github/{url.split('github.com/')[1]}/blob/main/" \
          f"notebooks/{path.name}"
  assert badge in cells[0].source and "Restart session" in cells[0].source
  assert [c.metadata.get("tags") for c in cells].count(["parameters"]) == 1
  assert "os.environ" not in "".join(c.source for c in cells)


def _with_parameters(notebook, **values):
  """Papermill's convention: a cell of assignments right after the one tagged `parameters`."""
  index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
  return notebook


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  """One tiny run shared by the notebooks that train (the first trains it, the next reuses it)."""
  return tmp_path_factory.mktemp("notebooks") / "run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, notebook_run):
  notebook = nbformat.read(path, as_version=4)
  if path.stem != "03_balancing_ablation":
    _with_parameters(notebook, RUN=str(notebook_run), STEPS=40)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}})
  client.execute()   # raises CellExecutionError, with the cell and its traceback, on any error
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3, "plots did not render inline"
