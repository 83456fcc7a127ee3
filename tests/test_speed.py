"""The speed machinery: gpt2jax/runtime.py (allocator settings, the compilation cache) and
benchmarks/ (that they run and what they count; tests never time anything)."""

import collections
import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import measure
from gpt2jax import flops, runtime
from gpt2jax.model import count_params

TINY = measure.SHAPES["T"]  # 1 layer, 2 heads, n_embd 32, block 16, batch 2, vocabulary 11


class _MallInfo2(ctypes.Structure):
  """glibc's struct mallinfo2: what malloc holds, and how."""
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def _bytes_malloc_got_from_mmap() -> int:
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  libc.mallinfo2.restype = _MallInfo2
  return libc.mallinfo2().hblkhd


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_settings_are_applied_when_gpt2jax_is_imported():
  """Catches the import no longer tuning glibc's allocator (a CPU step then pays page faults
  for its large temporary buffer): with the settings, malloc serves even a 64 MB block from
  its heap instead of a fresh mmap. (Fails under GPT2JAX_NO_MALLOPT=1, as it should.)"""
  import gpt2jax  # noqa: F401  (conftest imported it already: this test looks, never applies)

  before = _bytes_malloc_got_from_mmap()
  block = np.ones(64 << 20, np.uint8)  # through malloc
  assert _bytes_malloc_got_from_mmap() - before < block.nbytes


def _resident_bytes() -> int:
  return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_gives_the_freed_heap_back():
  """Catches runtime.release_free_memory doing nothing: the allocator settings keep freed
  memory in the process, and scoring a large file relies on this call to stay bounded."""
  if not runtime.tune_allocator():
    pytest.skip("the allocator settings are off (GPT2JAX_NO_MALLOPT=1): free() returns memory")
  block = np.ones(64 << 20, np.uint8)  # touched, so resident
  del block  # freed, but kept by the process
  kept = _resident_bytes()
  runtime.release_free_memory()
  assert kept - _resident_bytes() > 32 << 20


@pytest.mark.parametrize("env, expected", [
    ({}, "{home}/.cache/gpt2jax/xla"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/gpt2jax/xla"),
    ({"GPT2JAX_COMPILATION_CACHE": "/mine"}, "/mine"),
    ({"GPT2JAX_COMPILATION_CACHE": "off"}, None),
])
def test_compilation_cache_directory_follows_the_environment(monkeypatch, tmp_path, env,
                                                             expected):
  """Catches a cache that ignores XDG_CACHE_HOME or GPT2JAX_COMPILATION_CACHE (or "off")."""
  monkeypatch.setenv("HOME", str(tmp_path))
  for name in ("XDG_CACHE_HOME", runtime.CACHE_ENV):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  directory = runtime.compilation_cache_dir()
  assert (str(directory) if directory else None) == (
      expected.format(home=tmp_path) if expected else None)


@pytest.mark.slow
@pytest.mark.parametrize("jax_dir_given", [False, True])
def test_programs_compiled_by_an_entry_point_are_cached_on_disk(tmp_path, jax_dir_given):
  """Catches a cache that is configured but never written, or that overrides the user's own
  JAX_COMPILATION_CACHE_DIR."""
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


@pytest.mark.slow
def test_an_unusable_cache_directory_turns_the_cache_off_with_one_note(tmp_path):
  """Catches a JAX warning repeated at every compilation, or a crash, when the cache
  directory cannot be created."""
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


@pytest.mark.slow
def test_the_benchmark_command_runs_and_writes_its_results(tmp_path):
  """Catches a benchmark that no longer runs (an API it calls moved or changed), that ignores
  its flags, or whose JSON misses what README and the comparisons read. Its numbers are not
  checked: a tiny shape measures nothing."""
  args = ["--only=train,sample", "--shapes=T", "--steps=2", "--sample_shape=T",
          "--sample_tokens=3", "--sample_repeats=1", "--no_cache_batches=2",
          f"--out={tmp_path}"]
  done = subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=measure.REPO,
                        capture_output=True, text=True, encoding="utf-8", timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (written,) = tmp_path.glob("*.json")
  assert f"wrote {written}" in done.stdout
  results = json.loads(written.read_text(encoding="utf-8"))
  assert {"host", "cpu", "cores", "devices", "jax", "load_average",
          "load_average_after"} <= set(results["machine"])
  assert {"flops_per_second", "source"} <= set(results["peak"])
  (train,) = results["train"]
  assert train["shape"]["name"] == "T" and train["step_seconds"]["count"] == 2
  assert {"tokens_per_second", "tokens_per_second_range", "gflops_per_second", "mfu",
          "first_step_seconds"} <= set(train)
  assert [(r["shape"], r["batch"], r["use_cache"], r["new_tokens"], r["seconds"]["count"])
          for r in results["sample"]] == [("T", 1, True, 3, 1), ("T", 16, True, 3, 1),
                                          ("T", 2, False, 3, 1)]
  assert "startup" not in results and "recipe" not in results
  assert "train T: tokens/s" in done.stdout and "sample T, batch 16, KV cache" in done.stdout


def test_flops_per_token_is_nanogpts_estimate():
  import jax
  import jax.numpy as jnp
  from gpt2jax.model import GPT

  config = TINY.model_config()
  params = GPT(config).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  n = count_params(params) - 16 * 32  # without the position embedding
  assert flops.gpt_flops_per_token(config, params) == 6 * n + 12 * 1 * 16 * 32


def test_profile_counts_the_matmul_flops_of_every_part_of_the_model():
  """Catches matmuls the profile misses (an HLO form its parser does not read, a dot left
  unfused) or charges to the wrong part, and parts it no longer recognises once the model's
  modules are renamed. The reference is the textbook count for the tiny shape."""
  from benchmarks import profile

  state, step, batches = measure.train_setup(TINY)
  flops = collections.Counter()
  for op in profile.ops_of(step.lower(state, batches[0]).compile().as_text()).values():
    flops[op.part] += op.dot_flops
  tokens, d, vocab = TINY.batch_size * TINY.block_size, TINY.n_embd, TINY.vocab_size
  forward = {  # 2 FLOPs per multiply-add; one layer
      "attention: qkv projection (c_attn)": 2 * tokens * d * 3 * d,
      "attention: output projection (c_proj)": 2 * tokens * d * d,
      # QK^T and PV over the full block (16 queries: one chunk, no skipped triangle)
      "attention: softmax(QK^T)V, head split/merge": 2 * 2 * tokens * TINY.block_size * d,
      "MLP: c_fc": 2 * tokens * d * 4 * d,
      "MLP: c_proj": 2 * tokens * 4 * d * d,
      "embeddings, LM head": 2 * tokens * d * vocab,
  }
  expected = {f"{part}, fwd": n for part, n in forward.items()}
  expected |= {f"{part}, bwd": 2 * n for part, n in forward.items()}  # d(input), d(weights)
  assert {part: n for part, n in flops.items() if n} == expected


def test_profile_charges_every_traced_operation_of_the_step():
  """Catches a profile that cannot match the trace's events to the compiled step's
  operations (a changed trace format or event name), so that parts go missing or their
  matmuls are counted more or less than once per step."""
  from benchmarks import profile

  result = profile.profile(TINY, steps=2)
  parts = {p["part"] for p in result["parts"]}
  for part in ("MLP: c_fc", "LayerNorms", "attention: softmax(QK^T)V, head split/merge",
               "attention: qkv projection (c_attn)", "loss (cross-entropy)"):
    assert {f"{part}, fwd", f"{part}, bwd"} <= parts, part
  assert "optimizer update, gradient norm" in parts
  state, step, batches = measure.train_setup(TINY)
  hlo_flops = sum(op.dot_flops for op in
                  profile.ops_of(step.lower(state, batches[0]).compile().as_text()).values())
  assert result["matmul_gflop_per_step"] * 1e9 == pytest.approx(hlo_flops, rel=1e-9)


def test_wall_time_is_shared_by_the_operations_running_at_each_moment():
  """Catches double-charged overlaps, idle time inside a step lost or charged to an
  operation, and time between steps charged to the step."""
  from benchmarks import profile

  events = [(0, 10, "a"), (5, 15, "b"), (30, 40, "a"), (100, 110, "b")]  # (start, end, name)
  windows = [(0, 20), (25, 45)]  # two steps; the last event runs after them
  share, idle = profile.wall_shares(events, windows, part=str.upper)
  assert share == {"A": 5 + 5 / 2 + 10, "B": 5 / 2 + 5}
  assert idle == 5 + 5 + 5  # 15-20 in the first step; 25-30 and 40-45 in the second
  assert sum(share.values()) + idle == sum(end - start for start, end in windows)


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
  """Catches op names charged to the wrong part or direction (e.g. attention's c_proj taken
  for the MLP's, a backward op for a forward one)."""
  from benchmarks import profile

  assert profile.part_of(op_name) == part


@pytest.mark.parametrize("device, flags, expected", [
    (dict(platform="tpu"), set(), "bfloat16"),
    (dict(platform="gpu", compute_capability="8.0"), set(), "bfloat16"),
    (dict(platform="gpu", compute_capability="7.5"), set(), "float32"),  # T4, V100: no bf16
    (dict(platform="gpu"), set(), "float32"),  # ROCm: not measured
    (dict(platform="cpu"), {"avx512f", "avx512_bf16"}, "bfloat16"),
    (dict(platform="cpu"), {"amx_bf16"}, "bfloat16"),
    (dict(platform="cpu"), {"avx512f", "avx2"}, "float32"),
])
def test_auto_dtype_is_bfloat16_only_where_it_multiplies_fast(monkeypatch, device, flags,
                                                              expected):
  """Catches model.dtype=auto choosing bfloat16 on hardware that would emulate or upcast it
  (slower than float32), or float32 where bfloat16 is fast."""
  import types
  monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
  assert runtime.fast_compute_dtype(types.SimpleNamespace(**device)) == expected


def test_auto_dtype_resolves_in_the_model_config(monkeypatch):
  import ml_collections
  from gpt2jax.model import GPTConfig
  model_config = ml_collections.ConfigDict({"dtype": "auto", "n_layer": 1, "n_head": 1,
                                            "n_embd": 8, "block_size": 8})
  for flags, expected in (({"avx512_bf16"}, "bfloat16"), (set(), "float32")):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda flags=flags: frozenset(flags))
    assert GPTConfig.from_config(model_config, vocab_size=11).dtype == expected
