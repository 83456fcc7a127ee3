"""gpt2jax/optim.py: the learning-rate schedule, which parameters are weight-decayed, and
the optimizers (train.optimizer = adamw or muon)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_TEXT, tiny_config
from gpt2jax import optim, steps, train_lib
from gpt2jax.errors import UserError
from gpt2jax.metrics import read_metrics
from gpt2jax.model import GPT, GPTConfig
from gpt2jax.tokenizer import CharTokenizer

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


# ---------------------------------------------------------------------------------------------
# Muon (train.optimizer=muon): Muon on the blocks' kernels, AdamW on everything else.
# ---------------------------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
MUON = dict(train__optimizer="muon", train__muon_learning_rate=0.02)


def _path_names(tree) -> dict:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _params(config):
  model = GPT(GPTConfig.from_config(config.model, vocab_size=48))
  return model, model.init(jax.random.key(0),
                           jnp.zeros((1, config.model.block_size), jnp.int32))["params"]


def _one_update(config, params, grads):
  optimizer = optim.make_optimizer(config.train)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return _path_names(updates)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_orthogonalizes_each_block_kernel_and_leaves_the_rest_to_adamw(scan_layers):
  config = tiny_config(model__scan_layers=scan_layers, model__n_layer=3, train__weight_decay=0.0,
                       **MUON)
  _, params = _params(config)
  keys = iter(jax.random.split(jax.random.key(1), 100))
  grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
  muon = _one_update(config, params, grads)
  adamw = _one_update(tiny_config(model__scan_layers=scan_layers, model__n_layer=3,
                                  train__weight_decay=0.0), params, grads)

  muon_rate = float(optim.learning_rate_schedule(
      config.train, peak=config.train.muon_learning_rate)(0))
  kernels = [name for name in muon if name.endswith("kernel")]
  assert len(kernels) == (4 if scan_layers else 12)  # 4 per block; stacked when scanned
  for name in kernels:
    update = np.asarray(muon[name]).reshape((-1,) + muon[name].shape[-2:])
    assert update.shape[0] == (3 if scan_layers else 1)
    fan_in, fan_out = update.shape[-2:]
    scale = muon_rate * np.sqrt(max(1.0, fan_out / fan_in))
    for layer in update:  # each layer's matrix on its own, not the stacked tensor
      singular_values = np.linalg.svd(-layer / scale, compute_uv=False)
      # In units of Muon's step, Newton-Schulz's quintic maps the momentum's singular values
      # (spread over orders of magnitude by a random gradient) to about 0.7-1.2; only those
      # nearest 0 (a square random matrix has some) stay lower after its 5 iterations.
      assert singular_values.max() < 1.3, (name, singular_values)
      assert np.percentile(singular_values, 10) > 0.5, (name, singular_values)
      assert 0.6 < np.median(singular_values) < 1.1, (name, singular_values)
    assert not np.allclose(muon[name], adamw[name]), name

  for name in muon:  # embeddings (the tied head), biases, LayerNorms: AdamW's own update
    if not name.endswith("kernel"):
      np.testing.assert_array_equal(muon[name], adamw[name], err_msg=name)
  assert {n for n in muon if not n.endswith("kernel")} >= {"wte/embedding", "wpe/embedding",
                                                          "ln_f/scale", "ln_f/bias"}


def test_muon_labels_spare_an_untied_lm_head_and_weight_decay_stays_on_matrices():
  config = tiny_config(model__tie_embeddings=False)
  _, params = _params(config)
  labels = _path_names(optim.param_labels(params))
  assert labels["lm_head/kernel"] == "adamw"
  assert {name for name, label in labels.items() if label == "muon"} == {
      f"h_{i}/{m}/kernel" for i in range(2)
      for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
  decayed = _path_names(optim.weight_decay_mask(params))
  assert {name for name, on in decayed.items() if on} == {
      name for name in labels if name.endswith(("kernel", "embedding"))}


def _char_batches(count: int, block: int = 32, batch: int = 8) -> tuple[int, list]:
  tokenizer = CharTokenizer.train([TINY_TEXT])
  ids = np.asarray(tokenizer.encode(TINY_TEXT), np.int32)
  rng = np.random.default_rng(0)
  return tokenizer.vocab_size, [
      jnp.asarray(np.stack([ids[s:s + block + 1]
                            for s in rng.integers(0, len(ids) - block - 1, batch)]))
      for _ in range(count)]


def _train_losses(config, params, batches) -> list[float]:
  model = GPT(GPTConfig.from_config(config.model, vocab_size=48))
  optimizer = optim.make_optimizer(config.train)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  step = jax.jit(steps.make_train_step(model, optimizer,
                                       optim.learning_rate_schedule(config.train), config.seed))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_muon_scanned_and_unscanned_layers_train_alike():
  vocab, batches = _char_batches(12)
  assert vocab <= 48
  unscanned_config = tiny_config(**MUON)
  _, unscanned = _params(unscanned_config)
  blocks = [unscanned[f"h_{i}"] for i in range(unscanned_config.model.n_layer)]
  scanned = {name: leaf for name, leaf in unscanned.items() if not name.startswith("h_")}
  scanned["h"] = jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)

  expected = _train_losses(unscanned_config, unscanned, batches)
  actual = _train_losses(tiny_config(model__scan_layers=True, **MUON), scanned, batches)
  assert expected[-1] < expected[0] - 0.5  # it learns
  np.testing.assert_allclose(actual, expected, rtol=2e-5)


def test_a_tiny_muon_run_learns(tmp_path, tiny_text_file):
  train_lib.train_and_evaluate(tiny_config(tiny_text_file, **MUON), tmp_path)
  evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
  assert [r["step"] for r in evals] == [0, 20, 40]
  assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_a_resumed_muon_run_continues_exactly(tmp_path, tiny_text_file):
  config = tiny_config(tiny_text_file, train__decay_steps=40, model__dropout=0.1, **MUON)
  config.train.num_steps = 20  # as if interrupted after the checkpoint at step 20
  train_lib.train_and_evaluate(config, tmp_path)
  config.train.num_steps = 40
  resumed = train_lib.train_and_evaluate(config, tmp_path)
  uninterrupted = train_lib.train_and_evaluate(config, tmp_path / "straight")
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)  # params and Muon/AdamW state, bit for bit

  adamw = tiny_config(tiny_text_file, train__decay_steps=40, model__dropout=0.1)
  with pytest.raises(UserError, match=r"another optimizer's state \(train.optimizer: 'muon' -> "
                     r"'adamw'\).*--config.train.optimizer=muon to resume"):
    train_lib.train_and_evaluate(adamw, tmp_path)


def test_a_workdir_from_before_train_optimizer_resumes_as_adamw(tmp_path, tiny_text_file):
  config = tiny_config(tiny_text_file, train__num_steps=20)
  train_lib.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
  del saved["train"]["optimizer"]  # as written before the key existed
  (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
  config.train.num_steps = 21
  assert int(train_lib.train_and_evaluate(config, tmp_path).step) == 21
  with pytest.raises(UserError, match=r"train.optimizer: 'adamw' -> 'muon'.*"
                     r"--config.train.optimizer=adamw to resume"):
    train_lib.train_and_evaluate(tiny_config(tiny_text_file, train__num_steps=22, **MUON),
                                 tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (dict(train__optimizer="sgd"), "train.optimizer='sgd' is not an optimizer gpt2jax knows: "
     "set --config.train.optimizer to one of adamw, muon"),
    (dict(train__muon_learning_rate=0.0, **{"train__optimizer": "muon"}),
     "train.muon_learning_rate must be positive"),
    (dict(train__muon_momentum=1.0, **{"train__optimizer": "muon"}),
     "train.muon_momentum must be below 1"),
])
def test_bad_optimizer_settings_are_refused_before_any_work(tmp_path, overrides, message):
  config = tiny_config(tmp_path / "absent.txt", **overrides)
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_muon_skip_nonfinite_keeps_params_and_optimizer_state():
  config = tiny_config(**MUON)
  model, params = _params(config)
  optimizer = optim.make_optimizer(config.train)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  poisoned = jax.device_get(state.replace(params=jax.tree.map(
      lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state.params)))
  step = jax.jit(steps.make_train_step(model, optimizer, optim.learning_rate_schedule(
      config.train), config.seed, skip_nonfinite=True))
  new_state, metrics = step(poisoned, jnp.ones((8, config.model.block_size + 1), jnp.int32))
  assert bool(metrics["nonfinite"]) and int(new_state.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new_state)[1:], jax.tree_util.tree_leaves(poisoned)[1:]):
    np.testing.assert_array_equal(a, b)


MUON_FSDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from conftest import tiny_config
from gpt2jax import train_lib

def config(data, fsdp, steps):
  c = tiny_config({text!r}, **{run!r})
  c.mesh.data, c.mesh.fsdp, c.train.num_steps = data, fsdp, steps
  return c

# FSDP over 8 devices to step 3 (a checkpoint), then resumed on another mesh to step 6.
state = train_lib.train_and_evaluate(config(1, 8, 3), {workdir!r})
names = {{jax.tree_util.keystr(p, simple=True, separator="/"): list(x.sharding.spec)
         for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)}}
train_lib.train_and_evaluate(config(2, 4, 6), {workdir!r})
print(json.dumps(names))
"""


@pytest.mark.slow
def test_muon_under_fsdp_on_8_devices_matches_one_device(tmp_path, tiny_text_file):
  run = dict(train__num_steps=6, train__decay_steps=6, train__warmup_steps=2,
             train__log_every=1, train__eval_every=6, train__checkpoint_every=3,
             train__sample_tokens=0, **MUON)
  train_lib.train_and_evaluate(tiny_config(tiny_text_file, **run), tmp_path / "one")
  script = MUON_FSDP_SCRIPT.format(tests=str(TESTS), text=str(tiny_text_file), run=run,
                                   workdir=str(tmp_path / "fsdp"))
  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu", "PYTHONIOENCODING": "utf-8",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  specs = json.loads(done.stdout.strip().splitlines()[-1])

  losses = lambda workdir: {r["step"]: r["train_loss"] for r in read_metrics(workdir)
                            if "train_loss" in r}
  expected, actual = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
  assert sorted(actual) == sorted(expected) == list(range(7))
  for step in expected:
    assert actual[step] == pytest.approx(expected[step], rel=1e-5), step
  # Muon's momentum and AdamW's moments are split along n_embd like the parameters they track.
  muon_momenta = {n: s for n, s in specs.items() if "muon" in n and n.endswith("kernel")}
  assert len(muon_momenta) == 8 and all("fsdp" in s for s in muon_momenta.values()), specs
  assert specs[next(n for n in specs if "adamw" in n and n.endswith("wte/embedding"))] == [
      None, "fsdp"]
