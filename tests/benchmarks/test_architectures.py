"""benchmarks/architectures.py: the README table is replaced between its markers, never elsewhere."""

from __future__ import annotations

import pytest
from benchmarks.architectures import TABLE_END, TABLE_START, replace_table


def test_replace_table_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{TABLE_START}\nold\n{TABLE_END}\noutro\n")
    replace_table(readme, "| new |")
    assert readme.read_text() == f"intro\n{TABLE_START}\n| new |\n{TABLE_END}\noutro\n"


def test_replace_table_refuses_a_file_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        replace_table(readme, "| new |")
    assert readme.read_text() == "no markers\n"
