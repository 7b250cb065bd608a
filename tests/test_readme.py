"""The README is the front door: its set-up commands must be what CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    command = re.search(r"```bash\n(pip install -e \"\.\[dev\]\".*pytest.*)\n```", readme)
    assert command, "README.md must show the test set-up command in a bash block"
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command.group(1) in ci_lines


def test_quick_start_runs():
    readme = _read("README.md")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    # The block that runs offline (the pretrained one-liner downloads; test_hub covers it).
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", quick, re.S) if "init_params" in b)
    namespace = {}
    exec(compile(snippet, "README.md quick start", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1000)
