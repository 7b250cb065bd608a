"""The docs pages: every Python and shell snippet of README.md and docs/*.md runs, and the site
builds with `mkdocs build --strict`.

A snippet is run here unless the line before its fence (blank lines aside) is a marker:

    <!-- snippet: skip: WHY -->                    not run (a download, a GPU/TPU, minutes of work)
    <!-- snippet: tests/FILE.py::TEST -->          run by that test (with the fixtures it needs)

so a snippet is never run twice, and none is left unrun without a reason.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = ["README.md"] + sorted(
    f"docs/{f}" for f in os.listdir(DOCS) if f.endswith(".md")
)  # fmt: skip
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "bash"}
MARKER = re.compile(r"<!-- snippet: (.*?) -->")


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def snippets(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, marker) of every python or shell fence; marker None when unmarked."""
    lines = text.split("\n")
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = LANGUAGES.get(fence.group(1))
        if language:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.fullmatch(before.strip())
            code = "\n".join(lines[i + 1 : end]) + "\n"
            found.append((i + 1, language, code, marker.group(1) if marker else None))
        i = end + 1
    return found


def run_snippet(language: str, code: str, name: str, cwd) -> None:
    if language == "python":
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, f"{name}:\n{run.stdout}\n{run.stderr}"


@pytest.mark.parametrize("page", PAGES)
def test_every_snippet_is_run_or_marked(page):
    """Each marker names a reason to skip, or a test that exists and reads this page."""
    for line, _, _, marker in snippets(_read(page)):
        where = f"{page}:{line}"
        if marker is None:
            continue
        if marker.startswith("skip:"):
            assert marker[len("skip:") :].strip(), f"{where}: a skip marker needs its reason"
            continue
        path, _, test = marker.partition("::")
        assert path.startswith("tests/") and test, (
            f"{where}: marker {marker!r} is not skip: or a test"
        )
        assert os.path.exists(os.path.join(ROOT, path)), f"{where}: {path} does not exist"
        source = _read(path)
        assert re.search(rf"^def {re.escape(test)}\(", source, re.M), f"{where}: no {marker}"
        assert os.path.basename(page) in source, f"{where}: {path} does not read {page}"


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(m is None for *_, m in snippets(_read(p)))]
)  # fmt: skip
def test_unmarked_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for line, language, code, marker in snippets(_read(page)):
        if marker is None:
            run_snippet(language, code, f"{page}:{line}", tmp_path)


def test_snippets_are_found_and_run_as_written(tmp_path):
    """The parser and runner themselves, on a page of each kind of snippet."""
    page = (
        "text\n\n<!-- snippet: skip: needs a TPU -->\n\n```bash\nexit 1\n```\n\n"
        "```python\nvalue = 6 * 7\nassert value == 42\n```\n\n"
        "```bash\necho ran > out.txt\n```\n\n```\nnot a snippet\n```\n"
    )
    found = snippets(page)
    assert [(lang, marker) for _, lang, _, marker in found] == [
        ("bash", "skip: needs a TPU"), ("python", None), ("bash", None)
    ]  # fmt: skip
    for line, language, code, marker in found:
        if marker is None:
            run_snippet(language, code, f"page:{line}", tmp_path)
    assert (tmp_path / "out.txt").read_text() == "ran\n"
    with pytest.raises(AssertionError):
        run_snippet("bash", "exit 3", "page", tmp_path)


def test_readme_links_every_docs_page():
    readme = _read("README.md")
    missing = [p for p in PAGES[1:] if f"]({p})" not in readme]
    assert not missing, f"README's table does not link {missing}"


def test_mkdocs_build_is_strict_clean(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link resolving, no warning."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").exists()
