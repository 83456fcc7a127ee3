"""Evaluation on any text: every token scored once, with the context the block allows."""

import json
import math
import random

import jax
import numpy as np
import optax
import pytest

from conftest import run_module
from gpt2jax import runs, scoring
from gpt2jax.errors import UserError


@pytest.fixture(scope="module")
def loaded(trained_workdir):
  return runs.load_model(trained_workdir)


def direct_nats(loaded, contexts, targets):
  """Per-position losses of full forward passes over rows of context (no windows)."""
  logits, _ = jax.jit(loaded.model.apply)({"params": loaded.params}, np.asarray(contexts))
  return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(targets)))


def test_a_short_text_scores_as_one_full_forward_pass(loaded):
  text = "JULIET: שלום עולם"  # 17 tokens: fits one 32-token window
  score, scored = scoring.score_text(loaded, text)
  assert scored == text
  tokenizer = loaded.tokenizer
  seq = [tokenizer.eos_id] + tokenizer.encode(text)
  nats = direct_nats(loaded, [seq[:-1]], [seq[1:]])[0]
  assert score.tokens == len(nats) == 17
  assert score.loss == pytest.approx(nats.mean(), rel=1e-5)
  assert score.perplexity == pytest.approx(math.exp(nats.mean()), rel=1e-5)
  assert score.bits_per_byte == pytest.approx(nats.sum() / math.log(2) / len(text.encode()),
                                              rel=1e-5)
  assert score.bits_per_character == pytest.approx(nats.sum() / math.log(2) / len(text),
                                                   rel=1e-5)


def test_with_stride_one_every_token_sees_a_full_block(loaded):
  block = loaded.model.config.block_size
  ids = loaded.tokenizer.encode("ROMEO 1: שלום עולם, hello world number 1.\nJULIET: ויאמר")
  seq = [loaded.tokenizer.eos_id] + ids
  assert len(ids) > block + 10
  first_window = direct_nats(loaded, [seq[:block]], [seq[1:block + 1]])[0]
  later = range(block + 1, len(seq))  # each later token: the whole block before it
  last_in_block = direct_nats(loaded, [seq[j - block:j] for j in later],
                              [seq[j - block + 1:j + 1] for j in later])[:, -1]
  expected = np.concatenate([first_window, last_in_block])
  nats = scoring.token_nats(loaded.model, loaded.params, ids, eos_id=loaded.tokenizer.eos_id,
                            pad_id=loaded.tokenizer.pad_id, stride=1, batch_size=8)
  np.testing.assert_allclose(nats, expected, rtol=2e-5)


@pytest.mark.parametrize("num_targets, block, stride", [
    (5, 8, 2), (8, 8, 3), (9, 8, 8), (100, 8, 1), (100, 8, 3), (101, 16, 5), (64, 16, 16)])
def test_sliding_windows_score_each_token_once(num_targets, block, stride):
  windows = scoring.sliding_windows(num_targets, block, stride)
  scored = [j for w in windows for j in range(w.first_target, w.end + 1)]
  assert scored == list(range(1, num_targets + 1))
  for w in windows:
    assert 0 < w.end - w.start <= block and w.start < w.first_target
    # each scored token sees the whole block, or all the text before it, or at least
    # block - stride + 1 tokens
    context = w.first_target - w.start
    assert context == w.first_target or context >= block - stride + 1
  with pytest.raises(UserError, match="stride"):
    scoring.sliding_windows(10, block, block + 1)


def test_windows_built_while_the_ids_arrive_are_the_sliding_windows():
  rng = random.Random(0)
  for _ in range(300):
    n, block = rng.randrange(1, 120), rng.choice([4, 8, 16])
    stride = rng.randrange(1, block + 1)
    ids = np.arange(1, n + 1)
    chunks = np.split(ids, sorted(rng.sample(range(1, n), min(n - 1, rng.randrange(8)))))
    seq = np.concatenate([[0], ids])
    want = [(seq[w.start:w.end], seq[w.start + 1:w.end + 1], w.first_target - w.start - 1)
            for w in scoring.sliding_windows(n, block, stride)]
    got = list(scoring.stream_windows(chunks, block, stride, eos_id=0))
    assert len(got) == len(want), (n, block, stride)
    for (inputs, targets, first), (want_inputs, want_targets, want_first) in zip(got, want):
      np.testing.assert_array_equal(inputs, want_inputs)
      np.testing.assert_array_equal(targets, want_targets)
      assert first == want_first


def test_a_file_is_scored_a_piece_at_a_time_with_the_numbers_of_the_whole(
    loaded, tmp_path, monkeypatch):
  """Streaming changes nothing but memory: the ids and the nats of the whole text."""
  text = "".join(f"ROMEO {i}: שלום עולם, hello world number {i % 7}.\n" for i in range(40))
  path = tmp_path / "long.txt"
  path.write_text(text, encoding="utf-8")
  monkeypatch.setattr(scoring, "EVALUATE_PIECE_CHARS", 100)
  encoded = []
  real_encode = loaded.tokenizer.encode
  monkeypatch.setattr(loaded.tokenizer, "encode", lambda t: encoded.append(len(t)) or
                      real_encode(t))
  result = scoring.score_file(loaded, path, stride=5, batch_size=4, progress=False)
  assert len(encoded) > 10 and max(encoded) <= 100  # never the whole text at once
  ids = real_encode(text)
  nats = scoring.token_nats(loaded.model, loaded.params, ids, eos_id=loaded.tokenizer.eos_id,
                            pad_id=loaded.tokenizer.pad_id, stride=5, batch_size=4)
  assert result.score.tokens == len(ids) and result.score.bytes == len(text.encode())
  assert result.score.total_nats == pytest.approx(float(nats.sum()), rel=1e-12)
  assert not result.normalized and result.raw_characters == len(text)


def test_a_batch_of_windows_keeps_its_logits_within_a_budget():
  from gpt2jax.model import GPTConfig

  gpt2 = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
  small = GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256)
  assert scoring.default_batch_size(gpt2) == 1  # 206 MB of logits a window
  assert scoring.default_batch_size(small) == 32  # 4 MB a window


@pytest.mark.slow
def test_evaluate_command_prints_json(trained_workdir, tmp_path):
  text_file = tmp_path / "held_out.txt"
  text_file.write_text("ROMEO 3: שלום עולם, hello world number 3.\n" * 3, encoding="utf-8")
  result = run_module("gpt2jax.evaluate", f"--workdir={trained_workdir}",
                      f"--text_file={text_file}", "--json", "--stride=4")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["step"] == 40 and report["stride"] == 4
  assert "read 8.0x by the model" in result.stderr  # block 32, stride 4
  assert "scoring" in result.stderr and "100%" in result.stderr  # the progress bar
  assert report["characters"] == report["tokens"] == 42 * 3
  assert report["bytes"] == len(text_file.read_bytes())
  assert report["bits_per_byte"] == pytest.approx(
      report["total_nats"] / math.log(2) / report["bytes"], rel=1e-9)
  assert 0 < report["loss"] < math.log(loaded_vocab(trained_workdir))


def loaded_vocab(workdir):
  return json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_evaluate_refuses_empty_and_non_utf8_files(trained_workdir, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("caf\xe9".encode("latin-1"))
  for path, message in ((empty, "is empty"), (latin1, "is not UTF-8")):
    result = run_module("gpt2jax.evaluate", f"--workdir={trained_workdir}",
                        f"--text_file={path}")
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
  with pytest.raises(UserError, match="does not exist"):
    scoring.read_text_file(tmp_path / "missing.txt")
