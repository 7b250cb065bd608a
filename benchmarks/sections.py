"""One marked section of BENCHMARKS.md, replaced in place: how every benchmark writes its table.

Each benchmark owns the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, so rerunning
one never touches another's figures or the prose around them.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


def markers(name: str) -> tuple[str, str]:
    """The begin and end comments of section `name`."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_section(name: str, path: str = BENCHMARKS) -> str:
    """The section's current text between its markers ("" if BENCHMARKS.md has none)."""
    begin, end = markers(name)
    text = open(path).read()
    return text.split(begin, 1)[1].split(end, 1)[0] if begin in text else ""


def write_section(name: str, body: str, *, path: str = BENCHMARKS, append: bool = False) -> None:
    """Replace section `name` with `body`; a missing section is appended only if `append`.

    Refusing by default keeps a renamed marker from silently growing a second copy of a table.
    """
    begin, end = markers(name)
    text = open(path).read()
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    if begin in text:
        if end not in text.split(begin, 1)[1]:
            raise SystemExit(f"{os.path.basename(path)}: {begin} has no {end} after it")
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    elif append:
        text = text.rstrip() + "\n\n" + block + "\n"
    else:
        raise SystemExit(f"{os.path.basename(path)} has no {begin} ... {end} section to write")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote section {name} of {path}")
