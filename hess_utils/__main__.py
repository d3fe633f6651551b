"""``python -m hess_utils ...``: see :mod:`hess_utils.cli`."""

from hess_utils.cli import main

raise SystemExit(main())
