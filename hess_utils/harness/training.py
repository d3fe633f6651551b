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
(e.g. to save checkpoints). With ``router_aux_loss_coef`` :math:`\\alpha > 0` (mixture-of-experts models) each
step minimises :math:`\\ell_t + \\alpha\\, b_t` instead, :math:`b_t` the load-balancing term of
:func:`router_balance_loss` over the router calls of that forward; the recorded losses stay :math:`\\ell_t`
(the loss whose Hessian is studied has no such term). The recorded training
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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hess_utils import loss as L
from hess_utils.algorithms._frozen import freeze_arrays
from hess_utils.operators.routing import router_modules
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
    router_aux_loss_coef: float = 0.0,
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
    router_aux_loss_coef : float
        Weight :math:`\\alpha` of the load-balancing term of a mixture-of-experts model (module docstring);
        0 trains on the cross-entropy alone.

    Returns
    -------
    TrainingHistory

    Raises
    ------
    ValueError
        For empty batch lists, non-positive ``steps``/``lr``/``eval_every``, a negative weight decay, no trainable
        parameter, a non-finite loss (diverged: lower ``lr``), or ``router_aux_loss_coef > 0`` for a model
        whose routers report no logits.
    """
    if router_aux_loss_coef < 0 or not math.isfinite(router_aux_loss_coef):
        raise ValueError(f"router_aux_loss_coef must be a finite number >= 0, got {router_aux_loss_coef}")
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
                with _router_calls(model, router_aux_loss_coef > 0) as calls:
                    loss = L.lm_loss(model, [batch])
                value = float(loss.detach())
                if router_aux_loss_coef > 0:
                    loss = loss + router_aux_loss_coef * router_balance_loss(calls)
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


def router_balance_loss(calls: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The load-balancing term of top-k routing (Switch Transformer's, extended to top-k), averaged over calls.

    For one router call over ``T`` tokens with logits ``z`` of shape ``(T, E)`` and chosen experts ``I`` of
    shape ``(T, k)``: :math:`p_{te} = \\operatorname{softmax}(z_t)_e`, :math:`P_e = \\frac1T \\sum_t p_{te}` (mean
    router probability) and :math:`f_e = \\frac{1}{kT} \\sum_t [e \\in I_t]` (share of the ``kT`` slots sent to
    ``e``), and the term is :math:`E \\sum_e f_e P_e`: 1 when both are uniform, up to ``E`` when one expert takes
    everything. Gradients flow through :math:`P` only (the choice is piecewise constant). Returns the mean
    over the calls (a 0-dimensional tensor).
    """
    if not calls:
        raise ValueError("no router call was recorded: the model has no router that reports its logits")
    terms = []
    for logits, indices in calls:
        num_experts, k = logits.shape[-1], indices.shape[-1]
        probs = torch.softmax(logits.reshape(-1, num_experts).float(), dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, indices.reshape(-1, k).long(), 1.0)
        share = chosen.mean(0) / k
        terms.append(num_experts * (share * probs.mean(0)).sum())
    return torch.stack(terms).mean()


@contextlib.contextmanager
def _router_calls(model: torch.nn.Module, active: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(logits (T, E), indices (T, k))`` of every router call of the forwards inside the block (if ``active``).

    A router (:func:`hess_utils.operators.routing.router_modules`) returns a tuple whose first 2-D floating
    tensor is taken as the logits and whose first integer tensor as the top-k indices.
    """
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    if not active:
        yield calls
        return
    routers = router_modules(model)
    if not routers:
        raise ValueError(f"router_aux_loss_coef > 0 but {type(model).__name__} has no router module: set it to 0")

    def hook(module, args, output):
        items = output if isinstance(output, (tuple, list)) else (output,)
        logits = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2),
                      None)
        indices = next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
        if logits is not None and indices is not None:
            calls.append((logits, indices))

    handles = [m.register_forward_hook(hook) for _, m in routers]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
