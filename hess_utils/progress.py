"""Progress bars that suit where they are shown: live in a terminal or notebook, a line every 30 s in a log.

Every long loop of the package goes through :func:`progress_bar`. In a terminal or a Jupyter notebook it is
``tqdm.auto.tqdm`` as usual. When standard error is not a terminal (CI, ``make reproduce > log``), a bar
redraws at most every :data:`LOG_INTERVAL_S` seconds, so a log file holds one line per half minute
instead of one per step; ``TQDM_MININTERVAL`` in the environment overrides that interval.

Postfixes (:func:`set_postfix`) never force a redraw: ``tqdm``'s own ``set_postfix`` does by default,
which in a log writes one update per call whatever the interval.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

#: Seconds between two redraws of a bar whose output is not a terminal.
LOG_INTERVAL_S = 30.0


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether bars are seen live: standard error is a terminal, or this runs in a Jupyter kernel."""
    if _in_notebook():
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn at most every 30 s when nobody watches it live.

    ``mininterval`` given here or ``TQDM_MININTERVAL`` in the environment take precedence.
    """
    if "mininterval" not in kwargs:
        # tqdm reads TQDM_* once, at import; read it here too, so a later setting counts.
        env = os.environ.get("TQDM_MININTERVAL")
        if env:
            kwargs["mininterval"] = float(env)
        elif not interactive():
            kwargs["mininterval"] = LOG_INTERVAL_S
    if kwargs.get("mininterval", 0) > 10:
        kwargs.setdefault("maxinterval", kwargs["mininterval"])  # else tqdm's monitor redraws every 10 s
    return tqdm(iterable, **kwargs)


def set_postfix(bar: tqdm, text: str | None = None, **values: Any) -> None:
    """Show ``text`` (or ``key=value`` pairs) after the bar at its next redraw; never redraws by itself."""
    if text is not None:
        bar.set_postfix_str(text, refresh=False)
    else:
        bar.set_postfix(refresh=False, **values)


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """In a log, silence the bars of ``datasets`` and ``transformers`` for this block (restored after).

    Their bars ("Generating train split", "Loading weights") redraw at every step, whatever the interval.
    Live, in a terminal or notebook, they are left as they are.
    """
    if interactive():
        yield
        return
    import datasets
    import transformers

    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()
