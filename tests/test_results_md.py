"""benchmarks/results_md.py: each benchmark rewrites its own section of RESULTS.md and leaves the rest."""

import pytest

from benchmarks.results_md import replace_section


def test_a_section_is_inserted_once_then_replaced_and_hand_text_is_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Written by hand\n\nkeep me\n")
    replace_section("eigs", "table one", path)
    assert path.read_text().count("<!-- begin eigs -->") == 1
    replace_section("hvp", "hvp table", path)
    text = replace_section("eigs", "table two\n", path)
    assert "table one" not in text and "table two\n<!-- end eigs -->" in text
    assert text.startswith("# Benchmark results\n\n<!-- begin hvp -->\nhvp table\n<!-- end hvp -->\n")
    assert text.endswith("## Written by hand\n\nkeep me\n")
    assert list(tmp_path.iterdir()) == [path]  # written through a temporary file, nothing else left


def test_a_section_without_its_end_marker_is_refused(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n<!-- begin eigs -->\nold\n")
    with pytest.raises(ValueError, match="no end marker"):
        replace_section("eigs", "new", path)
    assert path.read_text().endswith("old\n")
