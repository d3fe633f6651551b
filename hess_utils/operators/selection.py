"""Choosing which parameters a Hessian is taken with respect to: names, globs, module types or a predicate."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch

ParamSelector = (
    None
    | str
    | type
    | Callable[[str, torch.nn.Parameter], bool]
    | Sequence["str | type"]
)


def _module_param_names(model: torch.nn.Module, types: tuple) -> set[str]:
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if any(_matches_type(module, t) for t in types):
            for p_name, _ in module.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def _matches_type(module: torch.nn.Module, t: type | str) -> bool:
    if isinstance(t, str):
        return type(module).__name__ == t
    return isinstance(module, t)


def is_type_selector(item: object) -> bool:
    """True for a module class, or a string naming one (starts upper case, no dot and no glob)."""
    if isinstance(item, type):
        return True
    return isinstance(item, str) and item[:1].isupper() and not any(c in item for c in ".*?[")


def select_parameters(model: torch.nn.Module, params: ParamSelector = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The selected ``(name, parameter)`` pairs in the model's own order (tied weights appear once).

    Parameters
    ----------
    params
        ``None``: every parameter with ``requires_grad``. A string: an exact name or a glob
        (``"transformer.h.0.*"``), or a module class name (``"Linear"``, ``"Conv1D"``). A module class
        (``torch.nn.Linear``). A list mixing those (union). A callable ``(name, param) -> bool``.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params) and not isinstance(params, type):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        items = [params] if isinstance(params, (str, type)) else list(params)
        types = tuple(i for i in items if is_type_selector(i))
        patterns = [i for i in items if not is_type_selector(i)]
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"cannot select parameters with {pattern!r}: use names, globs or module types")
        by_type = _module_param_names(model, types) if types else set()
        chosen = [
            (n, p)
            for n, p in named
            if n in by_type or any(n == pat or fnmatch.fnmatchcase(n, pat) for pat in patterns)
        ]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:5])
        raise ValueError(
            f"the parameter selection {params!r} matches no parameter; names look like: {examples}, ... "
            "(use exact names, globs such as 'model.layers.0.*', or module types such as 'Linear')"
        )
    return chosen
