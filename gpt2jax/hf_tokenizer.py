"""tokenizer.json files (Hugging Face `tokenizers`): any one as a gpt2jax tokenizer, and
gpt2jax's own tokenizers written as one.

Reading: `tokenizer.kind="hf"` with `tokenizer.path` (a tokenizer.json, or a directory holding
one: GPT-2's byte-level BPE of 50,257 tokens is the main case) gives an `HFTokenizer`. Its
end-of-text token comes from the file: tokenizer_config.json's eos_token when it sits beside
it, else the special token with a well-known name.

Writing (for gpt2jax.export): a character vocabulary becomes a BPE model without merges over
the characters (each character its own token), and a SentencePiece BPE becomes a BPE model
whose merges are every pair of pieces that joins into a piece, ranked by the piece's
SentencePiece score, with byte fallback, spaces kept as spaces and the newline as an atomic
token, as gpt2jax's SentencePiece settings have them. Both put end-of-text before the text,
as gpt2jax does with every prompt, and normalize as the run normalized its corpus.
`export_differences` checks the ids of the written file against gpt2jax's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from gpt2jax import errors
from gpt2jax.workdir import write_atomic
from gpt2jax.data.normalize import HEBREW_MARKS

HF_MODEL_FILE = "hf_tokenizer.json"  # the tokenizer.json, inside a workdir's tokenizer/
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"  # how exported tokenizers spell gpt2jax's end-of-text
# End-of-text tokens by the names common tokenizers give them, most likely first.
ENCODE_BATCH_CHARS = 2_000_000  # text given to `tokenizers` in one call: it holds offsets and
# strings for every token of a call until it returns, so this bounds encoding's memory
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class HFTokenizer:
  """A tokenizer.json read with the `tokenizers` library (kind 'hf')."""

  kind = "hf"

  def __init__(self, json_text: str, eos_token: str, source: str = "tokenizer.json"):
    from tokenizers import Tokenizer

    try:
      self._tok = Tokenizer.from_str(json_text)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
      raise errors.UserError(f"{source} is not a tokenizer.json the `tokenizers` library can "
                             f"read ({str(e)[:200]}).") from e
    # A file may carry truncation or padding settings; gpt2jax encodes whole documents.
    self._tok.no_truncation()
    self._tok.no_padding()
    self.json_text = json_text
    self.eos_token = eos_token
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    eos_id = self._tok.token_to_id(eos_token)
    if eos_id is None:
      raise errors.UserError(f"{source} has no token {eos_token!r} to end texts with: set "
                             f"--config.tokenizer.eos_token to one of {special_tokens(self._tok)}.")
    self.eos_id = eos_id
    self.pad_id = eos_id  # padded slots are masked out, so any id serves (GPT-2 has no pad)

  @classmethod
  def from_path(cls, path: str | Path, eos_token: str = "") -> "HFTokenizer":
    """A tokenizer.json file, or a directory holding one (a transformers model directory)."""
    if not str(path):
      raise errors.UserError("tokenizer.kind='hf' needs a tokenizer file: set "
                             "--config.tokenizer.path to a tokenizer.json or a directory "
                             "holding one.")
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise errors.UserError(
          f"{file} does not exist: tokenizer.path must name a tokenizer.json (transformers' "
          "AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR) writes DIR/tokenizer.json).")
    json_text = file.read_text(encoding="utf-8")
    if not eos_token:
      eos_token = _configured_eos(file.parent / TOKENIZER_CONFIG_JSON) or _eos_by_name(
          json_text, file)
    return cls(json_text, eos_token, source=str(file))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids, the texts given to `tokenizers` at most ENCODE_BATCH_CHARS at a time
    (or one longer text alone)."""
    ids, start = [], 0
    while start < len(texts):
      end, chars = start + 1, len(texts[start])
      while end < len(texts) and chars + len(texts[end]) <= ENCODE_BATCH_CHARS:
        chars += len(texts[end])
        end += 1
      ids += [e.ids for e in self._tok.encode_batch(list(texts[start:end]),
                                                    add_special_tokens=False)]
      start = end
    return ids

  def encode_prompt(self, text: str) -> list[int]:
    """What the model is given for a prompt: the file's own encoding with its special tokens
    (GPT-2's adds none), as transformers encodes it; end-of-text alone for an empty prompt."""
    return self._tok.encode(text).ids or [self.eos_id]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=False)

  def token_strings(self, ids: Iterable[int]) -> list[str]:
    """Each token's text; a token that is part of a character shows as its name in the file."""
    out = []
    for i in ids:
      text = self._tok.decode([int(i)], skip_special_tokens=False)
      out.append(text if text and "\ufffd" not in text else
                 (self._tok.id_to_token(int(i)) or f"<{int(i)}>"))
    return out

  def save(self, directory) -> None:
    from gpt2jax.tokenizer import TOKENIZER_JSON

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / HF_MODEL_FILE, self.json_text)
    write_atomic(directory / TOKENIZER_JSON, json.dumps({
        "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
        "pad_id": self.pad_id, "eos_token": self.eos_token, "model_file": HF_MODEL_FILE,
    }, ensure_ascii=False, indent=1))


def special_tokens(tok) -> list[str]:
  return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]


def _configured_eos(tokenizer_config: Path) -> str | None:
  """eos_token of a transformers tokenizer_config.json (a string or an AddedToken dict)."""
  if not tokenizer_config.is_file():
    return None
  eos = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("eos_token")
  return eos.get("content") if isinstance(eos, dict) else eos


def _eos_by_name(json_text: str, file: Path) -> str:
  from tokenizers import Tokenizer

  specials = special_tokens(Tokenizer.from_str(json_text))
  for name in EOS_NAMES:
    if name in specials:
      return name
  if len(specials) == 1:
    return specials[0]
  raise errors.UserError(f"{file}: cannot tell which token ends a text (special tokens: "
                         f"{specials or 'none'}): set --config.tokenizer.eos_token.")


def round_trip_failure(tokenizer, documents: Iterable[str]) -> str | None:
  """The first document that decode(encode(.)) does not give back, if any."""
  for doc in documents:
    if tokenizer.decode(tokenizer.encode(doc)) != doc:
      return doc
  return None


# --- gpt2jax tokenizers written as tokenizer.json ---------------------------------------------

def _normalizer(strip_hebrew_marks: bool):
  from tokenizers import Regex, normalizers

  steps = [normalizers.NFC()]
  if strip_hebrew_marks:
    steps.append(normalizers.Replace(Regex(f"[{HEBREW_MARKS}]"), ""))
  return normalizers.Sequence(steps)


def _with_end_of_text_first(tok, eos_id: int) -> None:
  from tokenizers import AddedToken, processors

  tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{END_OF_TEXT} $A", pair=f"{END_OF_TEXT} $A {END_OF_TEXT} $B:1",
      special_tokens=[(END_OF_TEXT, eos_id)])


def _char_tokenizer(tokenizer):
  from tokenizers import Tokenizer, decoders, models

  vocab = {c: i for i, c in enumerate(tokenizer.chars)}
  vocab.update({END_OF_TEXT: tokenizer.eos_id, "<|pad|>": tokenizer.pad_id})
  # Without a pre-tokenizer the whole text is one word, which a BPE without merges splits
  # into its characters: one token each.
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.decoder = decoders.Fuse()
  return tok


def _sentencepiece_tokenizer(tokenizer):
  from sentencepiece import sentencepiece_model_pb2 as spm_pb2
  from tokenizers import AddedToken, Tokenizer, decoders, models

  from gpt2jax.tokenizer import SPM_SPACE

  proto = spm_pb2.ModelProto()
  proto.ParseFromString(tokenizer.model_proto)
  kinds = spm_pb2.ModelProto.SentencePiece
  vocab, normal, atomic = {}, set(), []
  for i, piece in enumerate(proto.pieces):
    text = piece.piece
    if piece.type == kinds.NORMAL:
      # Spaces stay spaces: a literal U+2581 in the text then falls back to its bytes, as
      # gpt2jax encodes it, instead of reading as a space.
      text = text.replace(SPM_SPACE, " ")
      normal.add(text)
    elif piece.type == kinds.USER_DEFINED:  # the newline: never merged with its neighbours
      atomic.append(text)
    elif i == tokenizer.eos_id:
      text = END_OF_TEXT
    vocab[text] = i
  # SentencePiece merges the adjacent pair whose joined piece scores highest (leftmost
  # first); ranks follow the pieces' order, which is their score order.
  merges = sorted(((piece[:k], piece[k:]) for piece in normal for k in range(1, len(piece))
                   if piece[:k] in normal and piece[k:] in normal),
                  key=lambda pair: (vocab[pair[0] + pair[1]], len(pair[0])))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
  tok.add_tokens([AddedToken(text, normalized=False) for text in atomic])
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  return tok


def _hf_tokenizer_normalized(tokenizer: HFTokenizer, strip_hebrew_marks: bool):
  """The run's own tokenizer.json with the corpus's normalization before its own."""
  from tokenizers import Tokenizer, models

  carrier = Tokenizer(models.BPE())  # serializes the normalizer
  carrier.normalizer = _normalizer(strip_hebrew_marks)
  steps = json.loads(carrier.to_str())["normalizer"]["normalizers"]
  data = json.loads(tokenizer.json_text)
  own = data.get("normalizer")
  if own:
    steps += own["normalizers"] if own["type"] == "Sequence" else [own]
  data["normalizer"] = {"type": "Sequence", "normalizers": steps}
  return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def to_tokenizer_json(tokenizer, *, strip_hebrew_marks: bool) -> str:
  """The tokenizer.json text of a gpt2jax tokenizer, with the run's prompt normalization."""
  if tokenizer.kind == "hf":
    return _hf_tokenizer_normalized(tokenizer, strip_hebrew_marks).to_str()
  if tokenizer.kind == "char":
    tok = _char_tokenizer(tokenizer)
  elif tokenizer.kind == "bpe":
    tok = _sentencepiece_tokenizer(tokenizer)
  else:
    raise errors.UserError(f"A {tokenizer.kind!r} tokenizer cannot be written as tokenizer.json.")
  tok.normalizer = _normalizer(strip_hebrew_marks)
  _with_end_of_text_first(tok, tokenizer.eos_id)
  return tok.to_str()


def tokenizer_config(tokenizer, *, block_size: int) -> dict:
  """tokenizer_config.json for transformers' AutoTokenizer (a fast tokenizer, no slow files)."""
  eos = END_OF_TEXT if tokenizer.kind != "hf" else tokenizer.eos_token
  return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
          "eos_token": eos, "bos_token": eos, "clean_up_tokenization_spaces": False}


def export_differences(tokenizer, json_text: str, texts: Sequence[str], normalize
                       ) -> list[str]:
  """Texts on which the tokenizer.json's ids differ from gpt2jax's prompt ids, described.

  normalize: the run's prompt normalization (gpt2jax applies it before encoding; the file
  carries it as its normalizer). Two kinds of text are not compared, as they cannot agree:
  text holding the literal marker END_OF_TEXT, which the file reads as the end-of-text
  token and gpt2jax as characters, and text with characters outside a char vocabulary, which
  gpt2jax refuses and the file drops.
  """
  from tokenizers import Tokenizer

  exported = Tokenizer.from_str(json_text)
  problems = []
  for text in texts:
    if END_OF_TEXT in text:
      continue
    try:
      want = tokenizer.encode_prompt(normalize(text))
    except errors.UserError:  # a character the char vocabulary does not have
      continue
    got = exported.encode(text).ids
    if got != want:
      first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                   min(len(got), len(want)))
      problems.append(f"{text[:60]!r}: ids differ from token {first} on "
                      f"({got[first:first + 5]} instead of {want[first:first + 5]})")
    elif (decoded := exported.decode(got, skip_special_tokens=True)) != normalize(text):
      problems.append(f"{text[:60]!r}: decodes to {decoded[:60]!r}")
  return problems
