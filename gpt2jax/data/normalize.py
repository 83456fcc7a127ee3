"""Text normalization applied to every corpus and prompt before tokenizing."""

from __future__ import annotations

import re
import unicodedata

# Hebrew points (niqqud), cantillation marks (te'amim) and other combining marks live in
# U+0591..U+05C7 with Unicode category Mn. Maqaf, sof pasuq, paseq and nun hafukha in the same
# block are punctuation (Pd/Po) and stay.
HEBREW_MARKS = "".join(
    chr(c) for c in range(0x0591, 0x05C8) if unicodedata.category(chr(c)) == "Mn"
)
_HEBREW_MARKS_RE = re.compile(f"[{HEBREW_MARKS}]")


def normalize_text(text: str) -> str:
  """Canonical composition (NFC), so that equal-looking text gets equal tokens."""
  return unicodedata.normalize("NFC", text)


def strip_hebrew_marks(text: str) -> str:
  """Removes niqqud and cantillation, leaving the consonantal Hebrew text."""
  return _HEBREW_MARKS_RE.sub("", text)


def strips_hebrew_marks(data_config) -> bool:
  """Whether the corpus (and so every prompt) loses its Hebrew marks."""
  return "hebrew" in data_config.corpus.split("+") and not data_config.keep_niqqud
