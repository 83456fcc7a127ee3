"""gpt2jax.checkpoint: Orbax saves of the train state, restored whole or parameters alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.errors import UserError
from gpt2jax.steps import TrainState


def _state(value: float, step: int = 0) -> TrainState:
  params = {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.arange(2, dtype=jnp.float32)}
  return TrainState(jnp.asarray(step, jnp.int32), params, {"mu": jnp.full((3, 2), -value)})


def test_a_saved_state_restores_whole_or_as_parameters(tmp_path):
  checkpoints = Checkpoints(tmp_path, keep=2, async_save=False)
  for step in (1, 2, 3):
    checkpoints.save(step, _state(float(step)), {"tokens_seen": 10 * step})
  checkpoints.wait()
  assert checkpoints.steps() == [2, 3] and checkpoints.latest_step() == 3  # keep=2
  abstract = jax.eval_shape(lambda: _state(0.0))
  state, meta = checkpoints.restore(2, abstract)
  assert int(state.step) == 2 and meta == {"tokens_seen": 20, "step": 2}
  np.testing.assert_array_equal(state.params["w"], np.full((3, 2), 2.0))
  np.testing.assert_array_equal(state.opt_state["mu"], np.full((3, 2), -2.0))
  params = Checkpoints(tmp_path, for_training=False).restore_params(3, abstract.params)
  np.testing.assert_array_equal(params["w"], np.full((3, 2), 3.0))
  checkpoints.close()


def test_a_missing_step_names_the_ones_there(tmp_path):
  checkpoints = Checkpoints(tmp_path, async_save=False)
  checkpoints.save(5, _state(1.0), {})
  with pytest.raises(UserError, match=r"No checkpoint for step 4 .* available steps: \[5\]"):
    checkpoints.restore_params(4, jax.eval_shape(lambda: _state(0.0)).params)
  checkpoints.close()


def test_reading_creates_nothing(tmp_path):
  assert Checkpoints(tmp_path / "run", for_training=False).latest_step() is None
  assert not (tmp_path / "run").exists()
