"""The harness's one training loop: pretraining of the tiny embedded models, continued training (the HessFormer
device_map ablation, section 3.1) and the checkpoints of the sharpness-along-training study.

:func:`continue_training` takes a causal LM and runs ``steps`` AdamW updates on the mean token loss of
:mod:`hess_utils.loss`, cycling through ``train_batches``; every ``eval_every`` steps it evaluates the loss on
``val_batches`` (if given). Step ``t = 1..steps`` uses batch ``B_t = train_batches[(t - 1) mod len(train_batches)]`` and

.. math::

    \\ell_t = L(w_{t-1}; B_t), \\qquad g_t = \\nabla_w \\ell_t \\ \\text{(clipped to norm} \\le c
    \\text{ when } c \\text{ is given)}, \\qquad w_t = \\operatorname{AdamW}(w_{t-1}, g_t; \\eta, \\beta_1, \\beta_2,
    \\lambda),

where :math:`L` is the token-weighted mean cross-entropy (:func:`hess_utils.loss.lm_loss`). The learning rate
of step ``t`` is :math:`\\eta f(t - 1)` with :math:`f(s) = (s + 1) / W` for ``s < W`` (``warmup_steps``) and a
cosine from 1 down to ``min_lr_ratio`` over the remaining steps (:math:`f = 1` throughout with the defaults
``W = 0``, ``min_lr_ratio = 1``). Weight decay applies to every parameter, or with ``decay_matrices_only`` to
those of two or more dimensions (biases and norms undecayed). ``callback(step, model)`` runs after each update
(e.g. to save checkpoints). The recorded training
loss of step ``t`` is :math:`\\ell_t` (before the update); the validation loss of step ``t`` is
:math:`L(w_t; \\text{val})`, and step 0 records :math:`L(w_0; \\text{val})`.

The model is kept in eval mode throughout, so dropout is off and :math:`L` is the deterministic function of the
weights whose Hessian the rest of the package studies; two calls on equal weights with the same batches on the
same device give bit-identical losses. ``seed`` seeds
torch's global generator inside :func:`torch.random.fork_rng`, for models whose forward draws random numbers
anyway, without disturbing the caller's state.

The model may be split over devices by accelerate (``load_model(name, device_map="auto")``): the loss puts
each batch on the device of the input embeddings and the hooks move activations, so the same function
trains both ways; that is the point of the ablation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hess_utils import loss as L
from hess_utils.algorithms._frozen import freeze_arrays
from hess_utils.progress import progress_bar, set_postfix


@dataclass(frozen=True)
class TrainingHistory:
    """Losses of a :func:`continue_training` run (float64 numpy arrays, read-only).

    Attributes
    ----------
    train_steps : np.ndarray of int, shape (S,)
        ``1..S``.
    train_loss : np.ndarray, shape (S,)
        :math:`\\ell_t`, the loss of step ``t``'s batch before its update (nats per token).
    val_steps : np.ndarray of int, shape (E,)
        Steps at which the validation loss was evaluated: 0, every ``eval_every``-th step, and ``S``.
    val_loss : np.ndarray, shape (E,)
        :math:`L(w_t; \\text{val})` at those steps (nats per token).
    lr, weight_decay, grad_clip : float
        The optimiser settings (``grad_clip`` NaN when not clipped).
    seed : int
        The seed of the run.
    """

    train_steps: np.ndarray
    train_loss: np.ndarray
    val_steps: np.ndarray
    val_loss: np.ndarray
    lr: float
    weight_decay: float
    grad_clip: float
    seed: int

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def frame(self):
        """A long ``pandas.DataFrame`` with columns ``step, split, loss`` (split ``"train"`` or ``"validation"``)."""
        import pandas as pd

        return pd.concat([
            pd.DataFrame({"step": self.train_steps, "split": "train", "loss": self.train_loss}),
            pd.DataFrame({"step": self.val_steps, "split": "validation", "loss": self.val_loss}),
        ], ignore_index=True)


def _check_inputs(train_batches, val_batches, steps, lr, eval_every, weight_decay, grad_clip) -> None:
    if not train_batches:
        raise ValueError("train_batches is empty: pass a list of {'input_ids': ...} dicts (see load_batches)")
    if val_batches is not None and not val_batches:
        raise ValueError("val_batches is empty: pass at least one batch to evaluate the validation loss on, or None")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise ValueError(f"grad_clip must be positive or None (no clipping), got {grad_clip!r}")


def continue_training(
    model: torch.nn.Module,
    train_batches: Sequence[L.Batch],
    val_batches: Sequence[L.Batch],
    steps: int,
    lr: float = 3e-4,
    seed: int = 0,
    eval_every: int = 5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = 1.0,
    progress: bool = True,
    warmup_steps: int = 0,
    min_lr_ratio: float = 1.0,
    decay_matrices_only: bool = False,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    desc: str = "training",
) -> TrainingHistory:
    """Train ``model`` in place for ``steps`` AdamW steps (module docstring) and return the losses.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM returning ``.logits`` of shape ``(batch, seq, vocab)``, on one device or split by a device map.
        It is trained and left in eval mode (dropout off); only parameters with ``requires_grad`` are updated.
    train_batches : list of dict
        Dicts with ``input_ids`` ``(b, s)``; step ``t`` uses entry ``(t - 1) % len(train_batches)``.
    val_batches : list of dict or None
        The validation batches; their token-weighted mean loss is recorded (None: no validation).
    steps : int
        Number of updates ``S`` (at least 1).
    lr : float
        AdamW learning rate :math:`\\eta` (constant).
    seed : int
        Seed of torch's generator inside the loop (see the module docstring).
    eval_every : int
        Evaluate the validation loss every this many steps (and at steps 0 and ``S``).
    weight_decay : float
        AdamW's decoupled weight decay :math:`\\lambda`, applied to every parameter.
    betas : (float, float)
        AdamW's :math:`(\\beta_1, \\beta_2)`.
    grad_clip : float or None
        Clip the global gradient norm to this value; None: no clipping.
    progress : bool
        Show a progress bar.
    warmup_steps, min_lr_ratio : int, float
        The learning-rate schedule of the module docstring (constant by default).
    decay_matrices_only : bool
        Decay only parameters of two or more dimensions.
    callback : callable or None
        ``callback(step, model)`` after the update of each step ``1..S``.
    desc : str
        The progress bar's label.

    Returns
    -------
    TrainingHistory

    Raises
    ------
    ValueError
        For empty batch lists, non-positive ``steps``/``lr``/``eval_every``, a negative weight decay, no trainable
        parameter, or a non-finite loss (diverged: lower ``lr``).
    """
    _check_inputs(train_batches, val_batches, steps, lr, eval_every, weight_decay, grad_clip)
    train_batches = list(train_batches)
    val_batches = None if val_batches is None else list(val_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter of the model requires grad: nothing to train")
    if decay_matrices_only:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": float(weight_decay)},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": float(weight_decay)}]
    optimizer = torch.optim.AdamW(groups, lr=float(lr), betas=tuple(betas))

    def lr_factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        frac = (s - warmup_steps) / max(1, steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    train_loss: list[float] = []
    val_steps: list[int] = []
    val_loss: list[float] = []

    def evaluate(step: int) -> None:
        if val_batches is None:
            return
        with torch.no_grad():
            val_loss.append(float(L.lm_loss(model, val_batches)))
        val_steps.append(step)

    devices = sorted({p.device.type for p in params})
    with torch.random.fork_rng(devices=[] if devices == ["cpu"] else None):
        torch.manual_seed(int(seed))
        model.eval()
        try:
            evaluate(0)
            bar = progress_bar(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = float(lr) * lr_factor(step - 1)
                batch = train_batches[(step - 1) % len(train_batches)]
                loss = L.lm_loss(model, [batch])
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"the training loss is {value} at step {step}: training diverged; lower lr "
                                     f"(now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
                optimizer.step()
                train_loss.append(value)
                if step % eval_every == 0 or step == steps:
                    evaluate(step)
                if callback is not None:
                    callback(step, model)
                set_postfix(bar, loss=f"{value:.4f}", **({"val": f"{val_loss[-1]:.4f}"} if val_loss else {}))
            bar.close()
        finally:
            optimizer.zero_grad(set_to_none=True)
    return TrainingHistory(
        train_steps=np.arange(1, steps + 1),
        train_loss=np.asarray(train_loss, dtype=np.float64),
        val_steps=np.asarray(val_steps, dtype=np.int64),
        val_loss=np.asarray(val_loss, dtype=np.float64),
        lr=float(lr),
        weight_decay=float(weight_decay),
        grad_clip=float("nan") if grad_clip is None else float(grad_clip),
        seed=int(seed),
    )
