"""Check that this environment holds exactly the versions of the lock file (``make install`` runs it).

    python scripts/check_lock.py requirements.lock

Every ``name==version`` line of the lock must be installed at that version (torch's local tag ``+cpu``
included). Installed distributions the lock does not name are listed too: only the project itself may be
one. Prints one summary line; exits 1, naming each difference, when the environment is not the lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ALLOWED_EXTRA = {"hess-utils"}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-``, ``_`` and ``.`` made one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the pinned lines of a uv / pip-tools lock file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if match is None:
            raise SystemExit(f"{path}: cannot read the line {line!r} (expected name==version)")
        pins[canonical(match.group(1))] = match.group(3)
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    lock = Path(argv[0])
    pins, have = read_lock(lock), installed()
    problems = []
    for name, version in sorted(pins.items()):
        if name not in have:
            problems.append(f"{name}=={version} is in {lock} but not installed")
        elif have[name] != version:
            problems.append(f"{name} is {have[name]}, {lock} says {version}")
    extra = sorted(set(have) - set(pins) - ALLOWED_EXTRA)
    problems += [f"{name}=={have[name]} is installed but not in {lock}" for name in extra]
    if problems:
        print(f"the environment differs from {lock} ({len(problems)}):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("run `make install` in a fresh clone (or `rm -rf .venv && make install`)", file=sys.stderr)
        return 1
    print(f"environment = {lock}: {len(pins)} packages at the locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
