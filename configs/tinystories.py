"""A small story model on TinyStories (or any folder of plain-text stories).

  python train.py --config=configs/tinystories.py --config.data.path=TinyStoriesV2-GPT4-valid.txt

TinyStories marks story ends with <|endoftext|>, used here as the document separator. The
validation file (~22 MB) of TinyStories V2 is plenty on a CPU; the training file (~2 GB)
wants an accelerator. BPE with 4,096 pieces, 4 layers x 256, block 256.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.corpus = "text"
  config.data.separator = "<|endoftext|>"
  config.tokenizer.kind = "bpe"
  config.tokenizer.vocab_size = 4096
  config.model.n_layer = 4
  config.model.n_head = 4
  config.model.n_embd = 256
  config.model.block_size = 256
  config.model.dropout = 0.0
  config.train.batch_size = 32
  config.train.num_steps = 5000
  config.train.learning_rate = 1e-3
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.train.sample_prompt = "Once upon a time"
  return config
