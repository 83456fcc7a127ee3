"""The speed machinery works (benchmarks never time anything in tests)."""

import os
import platform
import subprocess
import sys

import pytest

from benchmarks import measure
from gpt2jax import flops, runtime
from gpt2jax.model import count_params

TINY = measure.Shape("tiny", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2,
                     vocab_size=11)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_settings_are_applied_when_gpt2jax_is_imported():
  import gpt2jax  # noqa: F401

  assert runtime.tune_allocator() is True


@pytest.mark.parametrize("env, expected", [
    ({}, "{home}/.cache/gpt2jax/xla"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/gpt2jax/xla"),
    ({"GPT2JAX_COMPILATION_CACHE": "/mine"}, "/mine"),
    ({"GPT2JAX_COMPILATION_CACHE": "off"}, None),
])
def test_compilation_cache_directory_follows_the_environment(monkeypatch, tmp_path, env,
                                                             expected):
  monkeypatch.setenv("HOME", str(tmp_path))
  for name in ("XDG_CACHE_HOME", runtime.CACHE_ENV):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  directory = runtime.compilation_cache_dir()
  assert (str(directory) if directory else None) == (
      expected.format(home=tmp_path) if expected else None)


@pytest.mark.parametrize("jax_dir_given", [False, True])
def test_programs_compiled_by_an_entry_point_are_cached_on_disk(tmp_path, jax_dir_given):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION_CACHE_DIR", runtime.CACHE_ENV))}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  if jax_dir_given:  # the user's own JAX setting is kept
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "own")
  code = "import gpt2jax, jax; jax.jit(lambda x: x * 3 + 1)(2).block_until_ready()"
  subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120,
                 cwd=measure.REPO)
  used = tmp_path / ("own" if jax_dir_given else "xdg/gpt2jax/xla")
  assert used.is_dir() and any(used.iterdir())
  assert (tmp_path / "xdg").exists() != jax_dir_given


def test_an_unusable_cache_directory_turns_the_cache_off_with_one_note(tmp_path):
  not_a_directory = tmp_path / "file"
  not_a_directory.write_text("")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE_DIR")}
  env[runtime.CACHE_ENV] = str(not_a_directory / "xla")
  code = ("import gpt2jax, jax; jax.jit(lambda x: x + 1)(1).block_until_ready(); "
          "jax.jit(lambda x: x * 2)(1).block_until_ready(); "
          "print(jax.config.jax_compilation_cache_dir)")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, cwd=measure.REPO, check=True)
  assert done.stdout.strip() == "None"
  assert done.stderr.count("compiled programs are not cached") == 1
  assert "Warning" not in done.stderr


def test_training_benchmark_reports_throughput_and_mfu():
  result = measure.train_throughput(TINY, steps=3, peak_flops=1e15)
  assert result["step_seconds"]["count"] == 3
  assert result["tokens_per_second"] == pytest.approx(
      TINY.batch_size * TINY.block_size / result["step_seconds"]["median"])
  assert 0 < result["mfu"] < 1
  low, high = result["tokens_per_second_range"]
  assert low <= result["tokens_per_second"] <= high


def test_flops_per_token_is_nanogpts_estimate():
  import jax
  import jax.numpy as jnp
  from gpt2jax.model import GPT

  config = TINY.model_config()
  params = GPT(config).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  n = count_params(params) - 16 * 32  # without the position embedding
  assert flops.gpt_flops_per_token(config, params) == 6 * n + 12 * 1 * 16 * 32


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_benchmark_generates_every_requested_token(use_cache):
  result = measure.sampling_speed(TINY, batch=2, new_tokens=6, use_cache=use_cache, repeats=1)
  assert result["tokens_per_second"] == pytest.approx(2 * 6 / result["seconds"]["median"])


def test_profile_charges_the_step_to_the_parts_of_the_model():
  from benchmarks import profile

  result = profile.profile(TINY, steps=2)
  parts = {p["part"]: p for p in result["parts"]}
  for part in ("MLP: c_fc, fwd", "MLP: c_fc, bwd", "LayerNorms, fwd",
               "attention: softmax(QK^T)V, head split/merge, bwd",
               "optimizer update, gradient norm"):
    assert parts[part]["ms_per_step"] > 0, part
  # The shares and the idle time add up to the wall time of the steps.
  charged = sum(p["ms_per_step"] for p in result["parts"]) + result["idle_ms_per_step"]
  assert charged == pytest.approx(result["step_ms"], rel=0.25)
  # c_fc's forward is one [tokens, n_embd] @ [n_embd, 4 n_embd] matmul per layer.
  assert parts["MLP: c_fc, fwd"]["matmul_gflops_per_second"] > 0
  tokens = TINY.batch_size * TINY.block_size
  assert result["matmul_gflop_per_step"] >= 3 * 2 * tokens * 32 * 128 * 1e-9


@pytest.mark.parametrize("op_name, part", [
    ("jit(train_step)/transpose(jvp(GPT))/GPT._blocks/h_3/mlp/c_proj/cond/branch_0_fun/dot",
     "MLP: c_proj, bwd"),
    ("jit(train_step)/jvp(GPT)/GPT._blocks/h_0/attn/c_attn/cond/branch_0_fun/dot_general",
     "attention: qkv projection (c_attn), fwd"),
    ("jit(train_step)/jvp(GPT)/GPT._blocks/h_0/attn/cond/branch_0_fun/bhqd,bhkd->bhqk/dot",
     "attention: softmax(QK^T)V, head split/merge, fwd"),
    ("jit(train_step)/transpose(jvp(GPT))/ln_f/mul", "LayerNorms, bwd"),
    ("jit(train_step)/jvp(jit(take_along_axis))/gather", "loss (cross-entropy), fwd"),
    ("jit(train_step)/jit(clip)/min", "optimizer update, gradient norm"),
])
def test_profile_names_parts_from_hlo_metadata(op_name, part):
  from benchmarks import profile

  assert profile.part_of(op_name) == part
