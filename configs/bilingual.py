"""One GPT for Hebrew and English: Tanakh + Mishnah + King James Bible, ONE BPE tokenizer.

  python train.py --config=configs/bilingual.py
  python sample.py --prompt="ויאמר" --prompt="And God said"

The tokenizer's 8,000 pieces are learned from both languages together (~1.7M training
tokens); a wider model than the single-language recipes to hold both (6 x 384, 13.8M
parameters). On a 2-core Xeon VM it trains at ~1,250 tokens/s, 1.8 s a step: the 3,000
default steps take about 1.5 hours. After 300 steps (9.5 min) the validation loss was 5.47
(1.72 bits/byte), and a Hebrew prompt could still drift into English.
"""

from configs import hebrew


def get_config():
  config = hebrew.get_config()
  config.data.corpus = "hebrew+english"
  config.tokenizer.vocab_size = 8000
  config.model.n_layer = 6
  config.model.n_head = 6
  config.model.n_embd = 384
  config.train.num_steps = 3000
  config.train.sample_prompt = ""
  return config
