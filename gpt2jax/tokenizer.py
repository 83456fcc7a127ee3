"""Tokenizers that round-trip exactly: a character vocabulary and SentencePiece BPE, and
any tokenizer.json (kind 'hf', see gpt2jax.hf_tokenizer).

The first two are trained on the corpus; all are saved as data files (JSON, SentencePiece
model) in a directory of the workdir, and loaded back by resumed runs and by sample.py. The
special ids (end-of-text, padding) are stored explicitly next to the vocabulary.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import random
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from gpt2jax import errors
from gpt2jax.workdir import write_atomic

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "spm.model"
# SentencePiece shows spaces as this meta symbol and decodes it back to a space, so a literal
# one in the text is encoded as its UTF-8 byte pieces instead (see SentencePieceTokenizer).
SPM_SPACE = "\u2581"


class Tokenizer(Protocol):
  kind: str
  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def encode_prompt(self, text: str) -> list[int]:
    """The ids a model is given for a prompt (never empty): a document's start, then text."""

  def decode(self, ids: Iterable[int]) -> str: ...

  def token_strings(self, ids: Iterable[int]) -> list[str]: ...

  def save(self, directory: str | os.PathLike) -> None: ...


def _write_json_atomic(path: Path, obj) -> None:
  write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def _end_of_text_then(tokenizer, text: str) -> list[int]:
  # Training puts end-of-text before every document, so a prompt starts a document the same way.
  return [tokenizer.eos_id] + tokenizer.encode(text)


class CharTokenizer:
  """One id per character seen in the corpus, then end-of-text and padding."""

  kind = "char"

  def __init__(self, chars: str):
    self.chars = chars
    self.eos_id = len(chars)
    self.pad_id = len(chars) + 1
    self.vocab_size = len(chars) + 2
    self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted

  @classmethod
  def train(cls, documents: Iterable[str]) -> "CharTokenizer":
    seen = set()
    for doc in documents:  # strings, or pieces of documents
      seen.update(doc if isinstance(doc, str) else doc.text)
    if not seen:
      raise errors.UserError("The corpus is empty: there is no text to build a vocabulary from.")
    return cls("".join(sorted(seen)))

  def encode_array(self, text: str) -> np.ndarray:
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(self._codepoints, codepoints)
    ids = np.minimum(ids, len(self.chars) - 1)
    unknown = self._codepoints[ids] != codepoints
    if unknown.any():
      char = chr(int(codepoints[np.argmax(unknown)]))
      name = unicodedata.name(char, "unnamed")
      raise errors.UserError(
          f"Character {char!r} (U+{ord(char):04X} {name}) is not in this char vocabulary: "
          "it never occurred in the training corpus. Remove it from the text, or train with "
          "--config.tokenizer.kind=bpe, which encodes any character."
      )
    return ids.astype(np.int32)

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_prompt(self, text: str) -> list[int]:
    return _end_of_text_then(self, text)

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.chars[i] for i in ids if i < len(self.chars))

  def token_strings(self, ids: Iterable[int]) -> list[str]:
    specials = {self.eos_id: "<eos>", self.pad_id: "<pad>"}
    return [specials.get(i) or self.chars[i] for i in ids]

  def save(self, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(directory / TOKENIZER_JSON, {
        "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
        "pad_id": self.pad_id, "chars": self.chars,
    })


class SentencePieceTokenizer:
  """SentencePiece BPE with byte fallback and no normalization: decode(encode(s)) == s."""

  kind = "bpe"
  UNK_ID, EOS_ID, PAD_ID = 0, 1, 2
  NEWLINE = "\n"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPM_SPACE.encode()]

  @classmethod
  def train(cls, documents: Iterable[str], *, vocab_size: int, character_coverage: float = 1.0,
            input_sentence_size: int = 2_000_000, sample_characters: int = 100_000_000,
            seed: int = 0) -> "SentencePieceTokenizer":
    import sentencepiece as spm

    lines = sample_lines(documents, input_sentence_size, seed, sample_characters)
    if not lines:
      raise errors.UserError("The corpus is empty: there is no text to train a tokenizer on.")
    spm.set_random_generator_seed(seed + 1)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
          vocab_size=vocab_size, byte_fallback=True, character_coverage=character_coverage,
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
          user_defined_symbols=[cls.NEWLINE], unk_id=cls.UNK_ID, eos_id=cls.EOS_ID,
          pad_id=cls.PAD_ID, bos_id=-1, max_sentence_length=1 << 16,
          num_threads=os.cpu_count() or 1, minloglevel=2,
      )
    except RuntimeError as e:
      raise errors.UserError(_explain_spm_error(str(e), vocab_size)) from e
    return cls(model.getvalue())

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not any(SPM_SPACE in t for t in texts):
      return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)
    return [self._encode_with_literal_spaces(t) for t in texts]

  def encode_prompt(self, text: str) -> list[int]:
    return _end_of_text_then(self, text)

  def _encode_with_literal_spaces(self, text: str) -> list[int]:
    parts = text.split(SPM_SPACE)
    ids = list(self._sp.encode(parts[0]))
    for part in parts[1:]:
      ids += self._space_bytes + self._sp.encode(part)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_strings(self, ids: Iterable[int]) -> list[str]:
    """Each token as the text it stands for (byte pieces as their byte, in hex)."""
    out = []
    for i in ids:
      i = int(i)
      if i in (self.eos_id, self.pad_id, self.UNK_ID):
        out.append(self._sp.id_to_piece(i))
      elif self._sp.is_byte(i):
        out.append(self._sp.id_to_piece(i))
      else:
        out.append(self._sp.decode([i]))
    return out

  def save(self, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / SPM_MODEL, self.model_proto)
    _write_json_atomic(directory / TOKENIZER_JSON, {
        "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
        "pad_id": self.pad_id, "model_file": SPM_MODEL,
    })


SAMPLE_LINE_CHARS = 8192  # longer lines are sampled in parts (SentencePiece skips > 64 KB)


def sample_lines(documents: Iterable, size: int, seed: int, max_chars: int = 100_000_000
                 ) -> list[str]:
  """Lines to train a tokenizer on, in corpus order: all non-empty lines when they are at
  most `size` lines and `max_chars` characters, else a sample within both bounds.

  documents: strings (whole documents) or pieces of documents (data.pieces.Piece), so no
  line is ever held whole: a line longer than SAMPLE_LINE_CHARS is sampled as parts of that
  length, cut at spaces, so one giant line is sampled throughout. Every line (or part) has
  the same chance to be drawn (each gets a uniform random key; the largest keys within both
  bounds are kept), so the sample's characters are a uniform draw from the corpus's, whether
  it holds many short lines or a few huge ones. One pass, memory bounded by the sample,
  reproducible from seed.
  """
  rng = random.Random(seed)
  heap: list[tuple[float, int, str]] = []  # (key, position in the corpus, line)
  chars = 0
  for index, line in enumerate(_sample_units(documents)):
    key = rng.random()
    full = len(heap) >= size or chars + len(line) > max_chars
    if full and heap and key <= heap[0][0]:
      continue  # it would be the first to go
    heapq.heappush(heap, (key, index, line))
    chars += len(line)
    while len(heap) > 1 and (len(heap) > size or chars > max_chars):
      chars -= len(heapq.heappop(heap)[2])
  return [line for _, _, line in sorted(heap, key=lambda entry: entry[1])]


def _sample_units(documents: Iterable) -> Iterator[str]:
  """The non-empty lines of the documents, long ones in parts of at most SAMPLE_LINE_CHARS."""
  from gpt2jax.data.pieces import as_pieces, document_pieces

  partial = ""  # the start of a line that goes on in the next piece
  for piece in as_pieces(documents):
    lines = (partial + piece.text).split("\n")
    partial = "" if piece.ends_document else lines.pop()
    if len(partial) > SAMPLE_LINE_CHARS:
      *parts, last = document_pieces(partial, SAMPLE_LINE_CHARS)
      lines += [part.text for part in parts]
      partial = last.text
    for line in lines:
      for part in document_pieces(line, SAMPLE_LINE_CHARS):
        if part.text:
          yield part.text
  if partial:
    yield partial


def _explain_spm_error(message: str, vocab_size: int) -> str:
  if "Vocabulary size is too high" in message or "Vocabulary size too high" in message:
    limit = message.rsplit("<=", 1)[-1].strip(" .")
    return (f"tokenizer.vocab_size={vocab_size} is too large for this corpus (at most {limit}): "
            f"set --config.tokenizer.vocab_size to a smaller value, or use a larger corpus.")
  if "smaller than required_chars" in message or "Vocabulary size is smaller" in message:
    return (f"tokenizer.vocab_size={vocab_size} is too small for this corpus's characters: "
            "set --config.tokenizer.vocab_size larger (BPE needs room for 256 byte pieces, "
            "the special tokens and every distinct character).")
  return f"Training the SentencePiece tokenizer failed: {message.strip()}"


def train_tokenizer(tokenizer_config, documents: Iterable[str], seed: int = 0) -> Tokenizer:
  """Trains the tokenizer `tokenizer_config.kind` names on the corpus documents."""
  kind = tokenizer_config.kind
  if kind == "char":
    return CharTokenizer.train(documents)
  if kind == "bpe":
    return SentencePieceTokenizer.train(
        documents, vocab_size=tokenizer_config.vocab_size,
        character_coverage=tokenizer_config.character_coverage,
        input_sentence_size=tokenizer_config.input_sentence_size,
        sample_characters=tokenizer_config.get("sample_characters", 100_000_000), seed=seed,
    )
  if kind == "hf":  # nothing to train: the file is the tokenizer
    from gpt2jax.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_path(tokenizer_config.get("path", ""),
                                 tokenizer_config.get("eos_token", ""))
  raise errors.UserError(f"tokenizer.kind={kind!r} is unknown: use 'char', 'bpe' or 'hf'.")


VOCAB_MULTIPLE = 64  # a tokenizer.json's vocabulary is padded to it in the model


def model_vocab_size(tokenizer: Tokenizer, model_config) -> int:
  """How many ids the model's embedding holds.

  model.vocab_size when set (a GPT-2 checkpoint's, or the one a run recorded), else the
  tokenizer's vocabulary: a tokenizer.json's rounded up to a multiple of VOCAB_MULTIPLE
  (GPT-2's 50,257 -> 50,304, as nanoGPT pads it, for matmuls of a friendlier size); char and
  SentencePiece vocabularies exactly (recipes choose round BPE sizes themselves). Ids past
  the tokenizer's are never sampled.
  """
  configured = model_config.get("vocab_size", 0)
  if configured:
    if configured < tokenizer.vocab_size:
      raise errors.UserError(
          f"The tokenizer has {tokenizer.vocab_size:,} tokens but the model only "
          f"{configured:,} (model.vocab_size): use the model's own tokenizer, or a model with "
          "a vocabulary at least as large.")
    return configured
  if tokenizer.kind == "hf":
    return -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  return tokenizer.vocab_size


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer saved by `save()`; reads only JSON and the SentencePiece model."""
  directory = Path(directory)
  meta_path = directory / TOKENIZER_JSON
  if not meta_path.exists():
    raise errors.UserError(f"No tokenizer in {directory}: expected {meta_path}.")
  meta = json.loads(meta_path.read_text(encoding="utf-8"))
  if meta["kind"] in ("bpe", "hf"):
    model_file = str(meta["model_file"])
    if Path(model_file).name != model_file:  # a workdir's files never point outside it
      raise errors.UserError(f"{meta_path}: model_file {model_file!r} must be a file name in "
                             f"{directory}.")
  if meta["kind"] == "char":
    tokenizer = CharTokenizer(meta["chars"])
  elif meta["kind"] == "bpe":
    tokenizer = SentencePieceTokenizer((directory / model_file).read_bytes())
  elif meta["kind"] == "hf":
    from gpt2jax.hf_tokenizer import HFTokenizer

    tokenizer = HFTokenizer((directory / model_file).read_text(encoding="utf-8"),
                            meta["eos_token"], source=str(directory / model_file))
  else:
    raise errors.UserError(f"{meta_path} names an unknown tokenizer kind {meta['kind']!r}.")
  if (tokenizer.eos_id, tokenizer.pad_id) != (meta["eos_id"], meta["pad_id"]):
    raise errors.UserError(f"{meta_path} does not match its vocabulary (special ids differ).")
  return tokenizer


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
  """A short hash that changes whenever the vocabulary does."""
  import hashlib

  if tokenizer.kind == "char":
    payload = ("char:" + tokenizer.chars).encode("utf-8")
  elif tokenizer.kind == "hf":
    payload = ("hf:" + tokenizer.eos_token + "\n" + tokenizer.json_text).encode("utf-8")
  else:
    payload = b"bpe:" + tokenizer.model_proto
  return hashlib.sha256(payload).hexdigest()[:16]
