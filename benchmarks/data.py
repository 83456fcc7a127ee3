"""Data preparation and evaluation on a large generated corpus: wall time and peak memory.

  python -m benchmarks.data --size_mb=300 --shape=one_line            # one 300 MB line
  python -m benchmarks.data --size_mb=300 --shape=lines --train_steps=3 --evaluate_mb=30
  python -m benchmarks.data --size_mb=30 --code=/tmp/old                # an older checkout

The corpus is generated in a temporary directory (deleted afterwards) from the packaged King
James Bible and Tanakh: their paragraphs and chapters shuffled and repeated up to the size, in
one of these shapes (with the default separator, a blank line, all but `docs` are ONE
document):
  docs      paragraphs separated by blank lines (many documents)
  lines     one paragraph per line, no blank lines
  text      paragraphs keep their line breaks, joined by single newlines
  one_line  everything on one line

Each measurement runs in a fresh child process: data preparation as configs/tinystories.py
does it (SentencePiece BPE, 4,096 pieces) with the time and peak RSS of each pass (scan,
tokenizer, encoding), then optionally `train.py` for --train_steps steps on the prepared data
and `python -m gpt2jax.evaluate` on the first --evaluate_mb MB of the corpus. --check decodes
the token cache and compares it with the corpus. Writes benchmarks/results/data-<time>-<host>.json.
Timings on shared machines are noisy; peak RSS is not.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

SHAPES = ("docs", "lines", "text", "one_line")


_SIZE_MB = flags.DEFINE_float("size_mb", 100, "Corpus size in MB.")
_SHAPE = flags.DEFINE_enum("shape", "one_line", SHAPES, "Corpus shape (see the docstring).")
_SEPARATOR = flags.DEFINE_string("separator", None, "data.separator (default: the recipe's).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bpe", "tokenizer.kind: bpe, char or hf.")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", "", "tokenizer.path, for kind hf (e.g. "
                                      "tests/fixtures/hf_gpt2_tiny: GPT-2's byte-level BPE).")
_CHECK = flags.DEFINE_bool("check", False, "Decode the token cache and compare with the text.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 0, "Then train this many steps.")
_EVALUATE_MB = flags.DEFINE_float("evaluate_mb", 0, "Then evaluate on this many MB of the "
                                  "corpus (needs --train_steps).")
_STRIDE = flags.DEFINE_integer("stride", None, "evaluate --stride (default: its own).")
_TIMEOUT = flags.DEFINE_float("timeout", 3600, "Seconds before a child is stopped.")
_CODE = flags.DEFINE_string("code", str(REPO), "The gpt2jax checkout to measure (e.g. an "
                            "older commit written out with `git archive`).")
_TMP = flags.DEFINE_string("tmp", None, "Where the corpus and workdir go (default: $TMPDIR).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the generated corpus and workdir.")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")


def generate_corpus(path: Path, size_bytes: int, shape: str, seed: int = 0) -> int:
  """Writes a corpus of about size_bytes in the given shape; returns its size in bytes."""
  from ml_collections import ConfigDict

  from gpt2jax.data import sources

  units = sources.english_documents(None)
  units += sources.hebrew_documents(ConfigDict({"keep_niqqud": False}))
  if shape in ("lines", "one_line"):
    units = [u.replace("\n", " ") for u in units]
  joiner = {"docs": "\n\n", "lines": "\n", "text": "\n", "one_line": " "}[shape]
  rng = random.Random(seed)
  written = 0
  with open(path, "w", encoding="utf-8") as f:
    while written < size_bytes:
      rng.shuffle(units)
      block = joiner.join(units).encode("utf-8")[:size_bytes - written]
      text = block.decode("utf-8", errors="ignore")
      if written:
        f.write(joiner)
        written += len(joiner.encode())
      f.write(text)
      written += len(text.encode("utf-8"))
  return path.stat().st_size


def _run(args: list[str], cwd: Path, timeout: float | None = None) -> dict:
  """Runs a command; its wall time, peak RSS (from wait4), exit code and output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8")
  start = time.perf_counter()
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err)
    deadline = None if timeout is None else start + timeout
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if deadline and time.perf_counter() > deadline:
        proc.kill()
        pid, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
  return {"seconds": wall, "peak_rss_gb": usage.ru_maxrss / 1e6, "returncode": proc.returncode,
          "timed_out": bool(deadline and wall > timeout), "stdout": stdout,
          "stderr_tail": stderr[-3000:]}


def _config_flags(corpus: Path, separator: str | None, tokenizer: str, tokenizer_path: str
                  ) -> list[str]:
  args = ["--config=configs/tinystories.py", f"--config.data.path={corpus}",
          f"--config.tokenizer.kind={tokenizer}"]
  if tokenizer_path:
    args.append(f"--config.tokenizer.path={Path(tokenizer_path).resolve()}")
  if separator is not None:
    args.append(f"--config.data.separator={separator}")
  return args


# --- the child: one preparation, instrumented pass by pass -------------------------------------

def _vm_hwm_gb() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1e6
  return float("nan")


def _reset_hwm() -> None:
  try:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current
  except OSError:
    pass


def child_prepare(config_args: list[str], workdir: str, check: bool) -> dict:
  """prepare_data with each pass timed and its peak RSS taken (run in a fresh process)."""
  from absl import flags
  from ml_collections import config_flags

  import gpt2jax  # noqa: F401  (process settings)
  from gpt2jax import tokenizer as tokenizer_lib
  from gpt2jax.data import pipeline, tokens

  config_flag = config_flags.DEFINE_config_file("config")
  flags.FLAGS([sys.argv[0], *config_args])
  config = config_flag.value
  passes = []

  def timed(name, fn):
    def wrapper(*args, **kwargs):
      _reset_hwm()
      start = time.perf_counter()
      result = fn(*args, **kwargs)
      passes.append({"pass": name, "seconds": time.perf_counter() - start,
                     "peak_rss_gb": _vm_hwm_gb()})
      return result
    return wrapper

  originals = tokens.scan_corpus, tokenizer_lib.train_tokenizer, tokens.cached_splits
  tokens.scan_corpus = timed("scan (lengths, digest)", tokens.scan_corpus)
  tokenizer_lib.train_tokenizer = timed("tokenizer (sample + training)",
                                        tokenizer_lib.train_tokenizer)
  tokens.cached_splits = timed("split + encode + write", tokens.cached_splits)
  start = time.perf_counter()
  data = pipeline.prepare_data(config, Path(workdir), reuse_tokenizer=False)
  result = {"seconds": time.perf_counter() - start, "passes": passes,
            "documents": data.num_documents, "characters": data.num_characters,
            "train_tokens": len(data.train.tokens), "val_tokens": len(data.val.tokens)}
  meta = json.loads((Path(workdir) / "data" / "tokens.json").read_text(encoding="utf-8"))
  result["cuts"] = {name: {k: v for k, v in split.items() if k.startswith("cuts")}
                    for name, split in meta["splits"].items()}
  tokens.scan_corpus, tokenizer_lib.train_tokenizer, tokens.cached_splits = originals
  if check:
    start = time.perf_counter()
    result["round_trip"] = _check_round_trip(config, data)
    result["round_trip_seconds"] = time.perf_counter() - start
  return result


def _decoded(tokenizer, ids, chunk: int = 1 << 20):
  """The text of a token array with '\\0' for end-of-text, decoded a bounded chunk at a time,
  each chunk ending before a token that is a whole character or more on its own."""
  start = 0
  while start < len(ids):
    end = min(start + chunk, len(ids))
    while end < len(ids) and "\ufffd" in tokenizer.decode([int(ids[end])]):
      end += 1
    part = np.asarray(ids[start:end])
    eos = np.flatnonzero(part == tokenizer.eos_id)
    bounds = [0, *(eos.tolist()), len(part)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
      lo += 1 if i else 0  # skip the end-of-text id itself
      if i:
        yield "\0"
      yield tokenizer.decode(part[lo:hi].tolist())
    start = end


def _check_round_trip(config, data) -> dict:
  """Whether decoding each split gives back exactly its text (documents end with '\\0')."""
  import hashlib
  from gpt2jax.data import sources, tokens

  scan_lengths = tokens.scan_corpus(sources.iter_pieces(config.data)).lengths
  train_chars = tokens.plan_split(scan_lengths, config.data.val_fraction,
                                  config.data.shuffle_documents)
  want = {name: hashlib.sha256() for name in tokens.SPLITS}
  for name, piece in tokens.split_pieces(sources.iter_pieces(config.data), train_chars):
    want[name].update((piece.text + ("\0" if piece.ends_document else "")).encode())
  ok = {}
  for name, split in (("train", data.train), ("val", data.val)):
    got = hashlib.sha256()
    for text in _decoded(data.tokenizer, split.tokens):
      got.update(text.encode())
    ok[name] = got.hexdigest() == want[name].hexdigest()
  return ok


# --- the parent ---------------------------------------------------------------------------------

def main(argv):
  del argv
  from absl import logging

  # This checkout's (`python -m benchmarks.data` imported its package before --code's path was
  # put first), also when --code measures another one.
  from benchmarks import results as results_lib

  logging.set_verbosity(logging.WARNING)
  code = Path(_CODE.value).resolve()
  tmp = Path(tempfile.mkdtemp(prefix="gpt2jax-data-bench-", dir=_TMP.value))
  results = {"machine": results_lib.machine(), "code": str(code), "shape": _SHAPE.value,
             "separator": _SEPARATOR.value, "tokenizer": _TOKENIZER.value,
             "tokenizer_path": _TOKENIZER_PATH.value,
             "started": datetime.datetime.now().isoformat(timespec="seconds")}
  try:
    corpus = tmp / f"corpus-{_SHAPE.value}.txt"
    start = time.perf_counter()
    results["corpus_bytes"] = generate_corpus(corpus, int(_SIZE_MB.value * 1e6), _SHAPE.value)
    print(f"generated {corpus} ({results['corpus_bytes'] / 1e6:.0f} MB, shape {_SHAPE.value}) "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    config_args = _config_flags(corpus, _SEPARATOR.value, _TOKENIZER.value,
                                _TOKENIZER_PATH.value)
    workdir = tmp / "run"
    child = [sys.executable, str(Path(__file__).resolve()), "--child=prepare",
             f"--code={code}", f"--workdir={workdir}", f"--check={_CHECK.value}",
             "--", *config_args]
    r = _run(child, code, timeout=_TIMEOUT.value)
    if r["returncode"] == 0:
      r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    results["prepare"] = r
    _report("prepare", r)
    if _TRAIN_STEPS.value and r["returncode"] == 0:
      results["train"] = _run([sys.executable, "train.py", *config_args, f"--workdir={workdir}",
                               f"--config.train.num_steps={_TRAIN_STEPS.value}",
                               "--config.train.warmup_steps=0",
                               "--config.train.log_every=1"], code, timeout=_TIMEOUT.value)
      _report(f"train.py, {_TRAIN_STEPS.value} steps (data from the cache)", results["train"])
    if _EVALUATE_MB.value and "train" in results and results["train"]["returncode"] == 0:
      text_file = tmp / "evaluate.txt"
      with open(corpus, "rb") as f:
        text_file.write_bytes(f.read(int(_EVALUATE_MB.value * 1e6)).decode("utf-8", "ignore")
                              .encode("utf-8"))
      args = [sys.executable, "-m", "gpt2jax.evaluate", f"--workdir={workdir}",
              f"--text_file={text_file}", "--json"]
      if _STRIDE.value:
        args.append(f"--stride={_STRIDE.value}")
      r = _run(args, code, timeout=_TIMEOUT.value)
      if r["returncode"] == 0:
        r["report"] = json.loads(r.pop("stdout").strip().splitlines()[-1])
      r["text_bytes"] = text_file.stat().st_size
      results["evaluate"] = r
      _report(f"evaluate, {r['text_bytes'] / 1e6:.1f} MB", r)
  finally:
    if not _KEEP.value:
      shutil.rmtree(tmp, ignore_errors=True)
  results["machine"]["load_average_after"] = results_lib.load_average()
  path = results_lib.write(results, _OUT.value, "data")
  print(f"load average after: {results['machine']['load_average_after']}; wrote {path}")


def _report(what: str, r: dict) -> None:
  status = ("timed out" if r["timed_out"] else
            "ok" if r["returncode"] == 0 else f"failed ({r['returncode']})")
  print(f"{what}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, {status}", flush=True)
  for p in r.get("passes", []):
    print(f"  {p['pass']:<32} {p['seconds']:8.1f} s   peak RSS {p['peak_rss_gb']:.2f} GB")
  if "cuts" in r:
    print(f"  cuts inside documents (that changed ids): " + ", ".join(
        f"{name} {c.get('cuts', '?')} ({c.get('cuts_that_change_ids', '?')})"
        for name, c in r["cuts"].items()))
  if "round_trip" in r:
    print(f"  tokens decode back to the corpus: {r['round_trip']}")
  if "report" in r:
    e = r["report"]
    print(f"  {e['tokens']:,} tokens, stride {e['stride']}, loss {e['loss']:.4f}")
  if r["returncode"] != 0 and not r["timed_out"]:
    print(r["stderr_tail"])


if __name__ == "__main__":
  _args = sys.argv[1:]
  _code = next((a.split("=", 1)[1] for a in _args if a.startswith("--code=")), str(REPO))
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(Path(_code).resolve()))  # the checkout measured comes first
  if "--child=prepare" in _args:
    own = dict(a[2:].split("=", 1) for a in _args[:_args.index("--")])
    print(json.dumps(child_prepare(_args[_args.index("--") + 1:], own["workdir"],
                                   own.get("check") == "True")))
  else:
    app.run(main)
