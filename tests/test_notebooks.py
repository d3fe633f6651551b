"""The notebook conventions (checked on every notebook, without running them) and the headless runner."""

from __future__ import annotations

import ast

import nbformat
import papermill
import pytest

from hess_utils.harness import notebooks
from hess_utils.paths import repo_root

REQUIRED = {"quick", "model_name", "data_name", "seed", "out_dir", "figures_dir"}
ALL = notebooks.list_notebooks()


def test_notebooks_are_listed_in_order():
    names = [p.name for p in ALL]
    assert names == sorted(names) and all(n[:2].isdigit() and n[2] == "_" for n in names)
    assert [p.name for p in notebooks.list_notebooks(select=["00"])] == ["00_quickstart.ipynb"]
    with pytest.raises(FileNotFoundError, match="no notebook"):
        notebooks.list_notebooks(select=["99"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        notebooks.list_notebooks(repo_root() / "no-such-folder")


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    assigned = {t.id for node in ast.parse(code[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert REQUIRED <= assigned, f"parameters cell lacks {REQUIRED - assigned}"
    # Papermill parses only literal assignments: the parameters cell says quick = False, and the next cell
    # turns quick on under make test (HESS_UTILS_QUICK=1, set by the root conftest.py for nbval's kernels).
    assigned_anyhow = {name.id for node in ast.parse(code[0].source).body if isinstance(node, ast.Assign)
                       for name in ast.walk(node.targets[0]) if isinstance(name, ast.Name)}
    seen_by_papermill = set(papermill.inspect_notebook(str(path)))
    assert assigned_anyhow == seen_by_papermill, (
        f"papermill cannot see {assigned_anyhow - seen_by_papermill}: one literal per line, no '=' in comments")
    assert 'quick = quick or os.environ.get("HESS_UTILS_QUICK", "0") == "1"' in code[1].source
    assert "\nif quick:" in code[1].source, "the cell after the parameters shrinks the sizes if quick"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "store without outputs"


def test_project_path_is_relative_to_the_checkout(tmp_path):
    assert notebooks.project_path("runs/x") == repo_root() / "runs" / "x"
    assert notebooks.project_path(tmp_path) == tmp_path


def test_a_failing_notebook_is_named(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("assert x == 2, 'boom'")]
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    source = tmp_path / "notebooks" / "00_broken.ipynb"
    source.parent.mkdir()
    nbformat.write(nb, source)
    with pytest.raises(notebooks.NotebookError, match="00_broken.ipynb.*boom"):
        notebooks.run_all(folder=source.parent, figures=tmp_path / "figures")
    assert (tmp_path / "figures" / "executed" / "00_broken.ipynb").exists()
    run = notebooks.run_notebook(source, tmp_path / "ok.ipynb", parameters={"x": 2}, cwd=tmp_path)
    assert run.seconds > 0 and run.executed.exists()


# Issue 14: notebooks hold parameters, calls, tables and plots; the analysis lives in the harness's study modules
# (tested in tests/), the preamble is one notebook_setup call. Checked on every notebook.
CODE_LINE_BUDGET = 80


def _code_lines(source: str) -> list[str]:
    return [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_has_no_def_one_setup_and_a_line_budget(path):
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    nodes = [node for source in code for node in ast.walk(ast.parse(source))]
    assert not [n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], \
        "move functions into hess_utils.harness.studies (with a test) or notebook_setup"
    assert not any(isinstance(n, ast.Lambda) for n in nodes)
    assert "notebook_setup(out_dir, figures_dir" in code[2], "the third code cell is the one setup call"
    assert "project_path" not in "".join(code) and "repo_root" not in "".join(code)
    lines = sum(len(_code_lines(source)) for source in code)
    assert lines <= CODE_LINE_BUDGET, f"{lines} code lines, budget {CODE_LINE_BUDGET}"
