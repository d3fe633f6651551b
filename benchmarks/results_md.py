"""``benchmarks/RESULTS.md`` as named sections, so that one benchmark rewrites its own table and no other.

``make bench`` runs several benchmarks one after the other; each used to write the whole file (the last one
erased the others' tables). A section is the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``;
text outside every section (measurements written up by hand) is kept as it is.
"""

from __future__ import annotations

from pathlib import Path

from hess_utils._io import write_text

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results\n\n"


def replace_section(name: str, text: str, path: Path = RESULTS_MD) -> str:
    """Put ``text`` into section ``name`` of ``path`` (atomically), after the title if the section is new.

    Returns the whole new file.
    """
    begin, end = f"<!-- begin {name} -->\n", f"<!-- end {name} -->\n"
    block = begin + text.rstrip("\n") + "\n" + end
    old = path.read_text(encoding="utf-8") if path.exists() else TITLE
    start = old.find(begin)
    if start >= 0:
        stop = old.find(end, start)
        if stop < 0:
            raise ValueError(f"{path}: section {name!r} has a begin marker and no end marker; add {end.strip()}")
        new = old[:start] + block + old[stop + len(end):]
    else:
        head = TITLE if old.startswith(TITLE) else ""
        new = head + block + "\n" + old[len(head):]
    write_text(path, new)
    return new
