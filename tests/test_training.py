"""continue_training: the recorded losses are the losses, the updates are AdamW's, and the run is deterministic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hess_utils.harness.training import TrainingHistory, continue_training
from hess_utils.loss import lm_loss
from tests.tiny import tiny_batches, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2", dtype=torch.float64)
    train = tiny_batches(num_batches=3, batch_size=2, seq_len=6, seed=1)
    val = tiny_batches(num_batches=2, batch_size=2, seq_len=6, seed=2)
    return model, train, val


def test_losses_are_the_losses_of_the_weights_before_each_update(setup):
    base, train, val = setup
    model = copy.deepcopy(base)
    with torch.no_grad():
        first_train, first_val = float(lm_loss(model, [train[0]])), float(lm_loss(model, val))
    hist = continue_training(model, train, val, steps=4, lr=1e-2, eval_every=2, progress=False)
    assert isinstance(hist, TrainingHistory)
    assert hist.train_loss[0] == pytest.approx(first_train, abs=1e-12)
    np.testing.assert_array_equal(hist.val_steps, [0, 2, 4])
    assert hist.val_loss[0] == pytest.approx(first_val, abs=1e-12)
    with torch.no_grad():  # the last validation loss is that of the final weights
        assert hist.val_loss[-1] == pytest.approx(float(lm_loss(model, val)), abs=1e-12)
    assert not model.training
    frame = hist.frame()
    assert list(frame.columns) == ["step", "split", "loss"] and len(frame) == 4 + 3


def test_one_step_is_an_adamw_step(setup):
    base, train, val = setup
    model, reference = copy.deepcopy(base), copy.deepcopy(base)
    continue_training(model, train, val, steps=1, lr=1e-3, weight_decay=0.1, grad_clip=None, progress=False)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    lm_loss(reference, [train[0]]).backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14, msg=name)
    # the first AdamW step moves every entry with a nonzero gradient by about lr (sign of the gradient)
    with torch.no_grad():
        moved = max(float((p - b).abs().max()) for p, b in zip(model.parameters(), base.parameters(), strict=True))
    assert 0.9e-3 < moved < 1.2e-3


def test_deterministic_and_learns_a_repeated_batch(setup):
    base, train, val = setup
    runs = [continue_training(copy.deepcopy(base), train[:1], train[:1], steps=25, lr=1e-2, eval_every=5, seed=3,
                              progress=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].train_loss, runs[1].train_loss)
    np.testing.assert_array_equal(runs[0].val_loss, runs[1].val_loss)
    assert runs[0].val_loss[-1] < 0.8 * runs[0].val_loss[0]  # one batch seen 25 times is fitted


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"),
    ({"lr": -1.0}, "lr"),
    ({"eval_every": 0}, "eval_every"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip": 0.0}, "grad_clip"),
])
def test_bad_arguments_are_refused(setup, kwargs, message):
    base, train, val = setup
    args = {"steps": 2, "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=message):
        continue_training(base, train, val, progress=False, **args)


def test_empty_batches_are_refused_and_dropout_stays_off(setup):
    base, train, val = setup
    with pytest.raises(ValueError, match="train_batches is empty"):
        continue_training(base, [], val, steps=1, progress=False)
    with pytest.raises(ValueError, match="val_batches is empty"):
        continue_training(base, train, [], steps=1, progress=False)
    assert base.transformer.drop.p > 0  # the test model has dropout; training in eval mode keeps it off
    runs = [continue_training(copy.deepcopy(base), train, val, steps=3, lr=1e-3, seed=s, progress=False)
            for s in (0, 1)]
    np.testing.assert_array_equal(runs[0].train_loss, runs[1].train_loss)
