"""gpt2jax/steps.py: the pure train step — gradient accumulation and the compute dtype.

(The step on a mesh of several devices is tested in test_parallel.py, skip_nonfinite in
test_bad_input.py.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from conftest import TINY_TEXT, tiny_config
from gpt2jax import kernels, optim, parallel, runtime, steps
from gpt2jax.model import GPT, GPTConfig
from gpt2jax.tokenizer import CharTokenizer


def _char_batches(text: str, block: int, batch: int, count: int) -> tuple[int, list]:
  tokenizer = CharTokenizer.train([text])
  ids = np.asarray(tokenizer.encode(text), np.int32)
  rng = np.random.default_rng(0)
  batches = [np.stack([ids[s:s + block + 1] for s in rng.integers(0, len(ids) - block - 1,
                                                                   batch)])
             for _ in range(count)]
  return tokenizer.vocab_size, batches


def _model_and_optimizer(config, vocab: int):
  return GPT(GPTConfig.from_config(config.model, vocab)), optim.make_optimizer(config.train)


def _steps(config, vocab: int, grad_accum_steps: int = 1):
  model, optimizer = _model_and_optimizer(config, vocab)
  state = steps.init_train_state(model, optimizer, config.seed)
  step = jax.jit(steps.make_train_step(model, optimizer,
                                       optim.learning_rate_schedule(config.train),
                                       config.seed, grad_accum_steps))
  return state, step


def test_gradient_accumulation_equals_one_large_batch():
  """Catches micro-batches that are averaged wrongly (e.g. summed, or the last one only),
  that overlap or skip rows, or a loss reported for one micro-batch."""
  config = tiny_config()
  vocab, (batch,) = _char_batches(TINY_TEXT, 32, 16, 1)
  state, step = _steps(config, vocab)
  accumulated_state, accumulated_step = _steps(config, vocab, grad_accum_steps=4)
  large, large_metrics = step(state, jnp.asarray(batch))
  micro, micro_metrics = accumulated_step(accumulated_state, jnp.asarray(batch))
  assert float(micro_metrics["loss"]) == pytest.approx(float(large_metrics["loss"]), rel=1e-6)
  assert float(micro_metrics["grad_norm"]) == pytest.approx(float(large_metrics["grad_norm"]),
                                                            rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(large.params), jax.tree_util.tree_leaves(micro.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_trains_close_to_float32():
  """Catches bfloat16 training that does not learn (e.g. the loss or softmax in bfloat16),
  or parameters that end up stored in bfloat16."""
  vocab, batches = _char_batches(TINY_TEXT, 32, 8, 30)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    state, step = _steps(tiny_config(model__dtype=dtype), vocab)
    history = []
    for batch in batches:
      state, step_metrics = step(state, jnp.asarray(batch))
      history.append(float(step_metrics["loss"]))
    losses[dtype] = np.array(history)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
  bf16, fp32 = losses["bfloat16"], losses["float32"]
  assert bf16[-5:].mean() < bf16[0] - 1.0  # it learns
  assert abs(bf16[-5:].mean() - fp32[-5:].mean()) < 0.1 * fp32[-5:].mean()


def matmul_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
  """(lhs, rhs) dtypes of every dot_general in a jaxpr, nested ones included (jit, scan,
  the branches of platform-dependent code, custom gradients)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(operand.aval.dtype) for operand in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += matmul_operand_dtypes(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += matmul_operand_dtypes(sub)
  return found


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bfloat16_really_computes_in_bfloat16(scan_layers):
  """Catches any matmul of the train step, forward or backward, that silently stays in
  float32 under model.dtype=bfloat16 (a layer that forgets to cast its input or kernel, a
  gradient computed from float32 residuals).

  jax.nn.dot_product_attention's own backward (the GPU/TPU branch) multiplies float32
  probabilities by bfloat16 values, so the rule is: no matmul with two float32 operands.
  """
  operands = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(model__dtype=dtype, model__scan_layers=scan_layers)
    model, optimizer = _model_and_optimizer(config, vocab=50)
    step = steps.make_train_step(model, optimizer, optim.learning_rate_schedule(config.train),
                                 config.seed)
    batch = jax.ShapeDtypeStruct((8, config.model.block_size + 1), jnp.int32)
    jaxpr = jax.make_jaxpr(step)(steps.abstract_train_state(model, optimizer), batch)
    operands[dtype] = matmul_operand_dtypes(jaxpr.jaxpr)
  assert operands["float32"] and set(operands["float32"]) == {("float32", "float32")}
  assert len(operands["bfloat16"]) == len(operands["float32"])  # the same program
  assert ("float32", "float32") not in operands["bfloat16"]
  assert operands["bfloat16"].count(("bfloat16", "bfloat16")) > len(operands["bfloat16"]) // 2


def test_cpu_compiler_options_compute_the_same_bits():
  """Catches a compiler option for faster compiles (runtime.compiler_options) that changes
  what the steps compute, e.g. one that lets LLVM reassociate or contract float arithmetic."""
  config = tiny_config()
  config.model.dropout = 0.1
  vocab, batches = _char_batches(TINY_TEXT, 32, 8, 3)
  model, optimizer = _model_and_optimizer(config, vocab)
  train_step = steps.make_train_step(model, optimizer, optim.learning_rate_schedule(config.train),
                                     config.seed)
  eval_step = steps.make_eval_step(model)
  results = []
  for options in (None, runtime.compiler_options("cpu")):
    step = jax.jit(train_step, compiler_options=options)
    state = steps.init_train_state(model, optimizer, config.seed, compiler_options=options)
    for batch in batches:
      state, _ = step(state, jnp.asarray(batch))
    loss = jax.jit(eval_step, compiler_options=options)(state.params, jnp.asarray(batches[0]))
    results.append((jax.device_get(state.params), float(loss)))
  (default_params, default_loss), (fast_params, fast_loss) = results
  assert runtime.compiler_options("cpu")  # the test compares something
  assert fast_loss == default_loss
  for a, b in zip(jax.tree.leaves(default_params), jax.tree.leaves(fast_params)):
    np.testing.assert_array_equal(a, b)


def test_the_sharded_steps_are_traced_for_the_mesh_and_compute_the_same_bits():
  """make_sharded_steps traces its train, eval and init programs for the mesh's platform
  (kernels.traced_for). Catches one that still traces every platform's path, and a CPU path
  that computes anything else, to the bit, than what platform_dependent picks when lowering."""
  config = tiny_config()
  config.model.dropout = 0.1
  vocab, batches = _char_batches(TINY_TEXT, 32, 8, 3)
  model, optimizer = _model_and_optimizer(config, vocab)
  mesh = parallel.make_mesh(config.mesh)
  sharded = steps.make_sharded_steps(config, model, mesh)
  batch = sharded.abstract_batch(8, 32)
  with jax.set_mesh(mesh):
    assert "platform_index" not in str(sharded.train_step.trace(sharded.abstract_state,
                                                                batch).jaxpr)
    assert "platform_index" not in str(sharded.eval_step.trace(sharded.abstract_state.params,
                                                               batch).jaxpr)
  options = runtime.compiler_options("cpu")
  lowered_step = jax.jit(steps.make_train_step(model, optimizer,
                                               optim.learning_rate_schedule(config.train),
                                               config.seed), compiler_options=options)
  lowered_eval = jax.jit(steps.make_eval_step(model), compiler_options=options)
  results = []
  for init, step, eval_step in (
      (lambda: steps.init_train_state(model, optimizer, config.seed, compiler_options=options),
       lowered_step, lowered_eval),
      (lambda: sharded.init(config.seed), sharded.train_step, sharded.eval_step)):
    state = init()
    for rows in batches:
      state, _ = step(state, jnp.asarray(rows))
    results.append((jax.device_get(state.params), float(eval_step(state.params,
                                                                  jnp.asarray(batches[0])))))
  (lowered_params, lowered_loss), (traced_params, traced_loss) = results
  assert traced_loss == lowered_loss
  for a, b in zip(jax.tree.leaves(lowered_params), jax.tree.leaves(traced_params)):
    np.testing.assert_array_equal(a, b)


def compiled_dots(hlo: str) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every dot in a compiled module's HLO text."""
  types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))  # instruction names are module-wide
  return [(types[lhs], types[rhs], out) for out, lhs, rhs in
          re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(%([^,\s]+), %([^,\s)]+)\)", hlo)]


@pytest.mark.parametrize("block_size", [64, 128])  # attention in 2 and 4 query chunks
def test_bfloat16_step_multiplies_bfloat16_and_computes_the_rest_in_float32(block_size):
  """The compiled CPU step under model.dtype=bfloat16. Catches matmuls that XLA CPU upcasts
  to float32 (a bf16 result, a transposed operand, a float32 output gradient), one it cannot
  run at all (bf16 x bf16 -> f32 outside YNNPACK fails when called), and softmax, GELU or
  LayerNorm arithmetic done in bfloat16, and a pad: the gradients of q, k and v must be
  joined by one concatenation (unpacking a [3, ...] array pads and adds them, which XLA CPU
  does element by element in bfloat16, a sixth of the recipe's step). (With a single query
  chunk, block_size < 64, XLA
  still upcasts one attention-gradient matmul per layer; test_bfloat16_trains_close_to_float32
  runs that case.)"""
  config = tiny_config(model__dtype="bfloat16", model__block_size=block_size)
  model, optimizer = _model_and_optimizer(config, vocab=50)
  state = steps.init_train_state(model, optimizer, config.seed)
  step = jax.jit(kernels.traced_for("cpu", steps.make_train_step(  # as train.py traces it
      model, optimizer, optim.learning_rate_schedule(config.train), config.seed)))
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 50, (8, block_size + 1)), jnp.int32)
  compiled = step.lower(state, batch).compile()
  hlo = compiled.as_text()
  dots = compiled_dots(hlo)
  assert dots and set(dots) == {("bf16", "bf16", "f32")}
  assert not re.search(r"= bf16\[[\d,]*\]\S* (exponential|tanh|rsqrt|log|divide)\(", hlo)
  assert " pad(" not in hlo
  _, step_metrics = compiled(state, batch)
  assert np.isfinite(float(step_metrics["loss"]))
