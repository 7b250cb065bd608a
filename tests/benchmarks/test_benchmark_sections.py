"""benchmarks/sections.py: each benchmark replaces only its own marked part of BENCHMARKS.md."""

import os
import subprocess
import sys

import pytest
from helpers import train as th

sys.path.insert(0, os.path.join(th.REPO, "benchmarks"))
import sections  # noqa: E402

DOC = """# Benchmarks

prose before

<!-- a:begin -->
old a table
<!-- a:end -->

between

<!-- b:begin -->
b table
<!-- b:end -->
after
"""


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = str(tmp_path / "B.md")
    open(path, "w").write(DOC)
    sections.write_section("a", "| new | a |\n", path=path)
    text = open(path).read()
    assert text == DOC.replace("old a table", "| new | a |")
    assert sections.read_section("a", path) == "\n| new | a |\n"
    assert sections.read_section("b", path) == "\nb table\n"
    sections.write_section("a", "again", path=path)  # idempotent markers: no second copy
    assert open(path).read().count("<!-- a:begin -->") == 1


def test_write_section_refuses_a_missing_or_broken_section_unless_told_to_append(tmp_path):
    path = str(tmp_path / "B.md")
    open(path, "w").write(DOC)
    with pytest.raises(SystemExit, match="no <!-- c:begin -->"):
        sections.write_section("c", "x", path=path)
    assert open(path).read() == DOC
    sections.write_section("c", "c table", path=path, append=True)
    assert open(path).read().endswith("after\n\n<!-- c:begin -->\nc table\n<!-- c:end -->\n")
    open(path, "w").write(DOC.replace("<!-- b:end -->", ""))
    with pytest.raises(SystemExit, match="has no <!-- b:end -->"):
        sections.write_section("b", "x", path=path)


def test_hbm_traffic_write_only_refuses_to_drop_unmeasured_rows():
    """On a fresh clone nothing is saved under runs/: --write-only must not empty the table."""
    before = open(os.path.join(th.REPO, "BENCHMARKS.md")).read()
    run = subprocess.run(
        [sys.executable, "benchmarks/hbm_traffic.py", "--write-only", "--recipe", "digits_finetune",
         "--topology", "v4:2x2x1"],
        cwd=th.REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "no saved measurement for digits_finetune" in run.stderr
    assert open(os.path.join(th.REPO, "BENCHMARKS.md")).read() == before
