import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script
from gpt2jax import sampling
from gpt2jax.errors import UserError
from gpt2jax.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def params():
  return jax.jit(GPT(CONFIG).init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]


def test_top_k_keeps_exactly_k_candidates():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0, -1.0]])
  kept = sampling.filter_logits(logits, top_k=2, top_p=1.0)
  assert (np.asarray(kept) > -1e30).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  kept = np.asarray(sampling.filter_logits(jnp.log(probs), top_k=0, top_p=0.7)) > -1e30
  assert kept.tolist() == [[True, True, False, False]]
  kept = np.asarray(sampling.filter_logits(jnp.log(probs), top_k=0, top_p=0.5)) > -1e30
  assert kept.tolist() == [[True, False, False, False]]


def test_sampled_tokens_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  tokens = np.asarray(sampling.sample_token(logits, jax.random.key(0), jnp.float32(1.0), 0, 0.7))
  assert set(tokens.tolist()) == {0, 1}
  assert np.mean(tokens == 0) == pytest.approx(0.5 / 0.8, abs=0.03)


def loop_bodies(hlo_text: str) -> list[str]:
  """The text of every while loop's body computation in a compiled module's HLO."""
  names = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo_text)
  return [re.search(rf"^%?{re.escape(name)} .*?^\}}", hlo_text, re.M | re.S).group(0)
          for name in names]


@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_updates_the_cache_in_place(params, batch):
  """No copy of a layer's whole KV cache per decoded token (see kernels.cache_update)."""
  model = GPT(CONFIG)
  start = jnp.zeros((batch,), jnp.int32)
  logits, cache = sampling._prefill(model, params, jnp.ones((batch, 4), jnp.int32), start)
  hlo = sampling._decode.lower(
      model, params, cache, logits, jax.random.key(0), jnp.zeros((batch,), bool), 8,
      jnp.float32(1.0), 0, jnp.int32(CONFIG.vocab_size), top_k=0, top_p=1.0,
      max_steps=CONFIG.block_size).compile().as_text()
  layer_cache = r"f32\[%d,%d,%d,%d\]" % (batch, CONFIG.n_head, CONFIG.block_size,
                                           CONFIG.head_dim)
  bodies = [body for body in loop_bodies(hlo) if re.search(layer_cache, body)]
  assert bodies, "no decoding loop found"
  for body in bodies:
    assert not re.search(layer_cache + r"\S* copy\(", body)


@pytest.mark.parametrize("prompts", [[[3, 4, 5]], [[3], [7, 8, 9, 10, 11]]])
def test_cached_greedy_decoding_equals_full_recompute(params, prompts):
  options = sampling.SamplingOptions(max_new_tokens=10, temperature=0.0, stop_at_eos=False)
  cached = sampling.generate(GPT(CONFIG), params, prompts, options, eos_id=0, pad_id=1)
  full = sampling.generate(GPT(CONFIG), params, prompts, options, eos_id=0, pad_id=1,
                           use_cache=False)
  assert [len(t) for t in cached] == [10] * len(prompts)
  assert cached == full


def test_generation_continues_past_the_block(params):
  # 40 new tokens from a 16-token block: the context window moves on twice. Until the first
  # move (block - prompt length tokens) both decoders see the same context.
  options = sampling.SamplingOptions(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
  cached = sampling.generate(GPT(CONFIG), params, [[3, 4, 5]], options, eos_id=0, pad_id=1)[0]
  full = sampling.generate(GPT(CONFIG), params, [[3, 4, 5]], options, eos_id=0, pad_id=1,
                           use_cache=False)[0]
  assert len(cached) == len(full) == 40
  assert cached[:CONFIG.block_size - 3] == full[:CONFIG.block_size - 3]


def test_generation_stops_at_end_of_text(params):
  greedy = sampling.SamplingOptions(max_new_tokens=10, temperature=0.0, stop_at_eos=False)
  tokens = sampling.generate(GPT(CONFIG), params, [[3, 4]], greedy, eos_id=0, pad_id=1)[0]
  eos = tokens[2]  # declare the third greedy token end-of-text
  stopping = sampling.SamplingOptions(max_new_tokens=10, temperature=0.0)
  assert sampling.generate(GPT(CONFIG), params, [[3, 4]], stopping, eos_id=eos,
                           pad_id=1)[0] == tokens[:tokens.index(eos)]


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new"),
])
def test_bad_sampling_options_are_refused(options, message):
  with pytest.raises(UserError, match=message):
    sampling.SamplingOptions(**options).validate()


@pytest.mark.slow
def test_sample_script_prints_continuations_of_each_prompt(trained_workdir):
  result = run_script("sample.py", f"--workdir={trained_workdir}", "--prompt=ROMEO",
                      "--prompt=JULIET: ויאמר", "--max_new_tokens=20", "--num_samples=2",
                      "--top_k=5", "--top_p=0.9")
  assert result.returncode == 0, result.stderr
  samples = result.stdout.strip("\n").split("\n---------------\n")
  assert len(samples) == 4
  assert samples[0].startswith("ROMEO") and samples[3].startswith("JULIET: ויאמר")
  assert len(samples[0]) > len("ROMEO")


@pytest.mark.slow
def test_sample_script_errors_are_one_line(trained_workdir, tmp_path):
  empty = run_script("sample.py", f"--workdir={trained_workdir}", "--prompt=")
  assert empty.returncode == 1 and "prompt is empty" in empty.stderr
  assert "Traceback" not in empty.stderr
  unknown = run_script("sample.py", f"--workdir={trained_workdir}", "--prompt=€")
  assert unknown.returncode == 1 and "U+20AC" in unknown.stderr
  missing = run_script("sample.py", f"--workdir={tmp_path / 'none'}")
  assert missing.returncode == 1 and "does not exist" in missing.stderr
  bad_step = run_script("sample.py", f"--workdir={trained_workdir}", "--step=7")
  assert bad_step.returncode == 1 and "available steps: [20, 40]" in bad_step.stderr


@pytest.mark.slow
def test_sample_script_defaults_to_the_latest_run(trained_workdir):
  runs = trained_workdir.parent  # the fixture's workdir lives in <tmp>/runs/tiny
  result = run_script("sample.py", "--max_new_tokens=5", cwd=runs.parent)
  assert result.returncode == 0, result.stderr
  assert f"sampling from runs/{trained_workdir.name}" in result.stderr
