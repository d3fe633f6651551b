"""``python -m hess_utils.harness {prepare,reproduce}``: build the embedded data and models; run the notebooks."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hess_utils.harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("prepare", help="prepare the embedded corpora and models (idempotent; cached under data/)",
                   description="Build the embedded corpora, tokenizers and models under data/ (cached).")
    rep = sub.add_parser("reproduce", help="the main job: run every notebook headless (figures under figures/)",
                         description="The main job: every notebook of notebooks/ in order with papermill on its "
                                     "defaults; executed copies in figures/executed/, figures in figures/, results "
                                     "cached in runs/notebooks (a re-run only re-plots). Stops at the first failing "
                                     "notebook, naming it.")
    rep.add_argument("--quick", action="store_true",
                     help="pass quick=True to every notebook (small sizes, a smoke test); figures and executed "
                          "copies under figures/quick/")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 for a failing notebook, 2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from hess_utils.harness import corpora, zoo

            corpora.prepare_all()
            zoo.prepare_all()
        else:
            from hess_utils.harness.notebooks import NotebookError, run_all

            try:
                run_all(quick=args.quick)
            except NotebookError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 1
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
