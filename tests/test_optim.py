"""gpt2jax/optim.py: the learning-rate schedule and which parameters are weight-decayed."""

import numpy as np
import pytest

from conftest import tiny_config
from gpt2jax import optim


def test_learning_rate_warms_up_then_decays_to_the_minimum():
  """Catches a schedule off by one step (a first update with learning rate 0) or one that
  ends above min_learning_rate."""
  config = tiny_config(train__num_steps=100, train__warmup_steps=10)
  schedule = optim.learning_rate_schedule(config.train)
  assert schedule(0) == pytest.approx(config.train.learning_rate / 10)
  assert schedule(9) == pytest.approx(config.train.learning_rate)
  assert schedule(99) == pytest.approx(config.train.min_learning_rate)


def test_weight_decay_applies_to_matrices_only():
  """Catches decay of biases or LayerNorm scales, or none on the (tied) embedding."""
  params = {"h_0": {"c_fc": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
                    "ln_1": {"scale": np.ones(2)}}, "wte": {"embedding": np.ones((3, 2))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"h_0": {"c_fc": {"kernel": True, "bias": False}, "ln_1": {"scale": False}},
                  "wte": {"embedding": True}}
