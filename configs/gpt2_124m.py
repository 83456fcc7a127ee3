"""GPT-2 small (124M parameters): 12 layers, 12 heads, n_embd 768, block 1024.

  python train.py --config=configs/gpt2_124m.py --config.data.path=corpus/

A BPE vocabulary of 50,304 pieces (GPT-2's 50,257 rounded up to a multiple of 64) is trained
on your corpus, which must be large enough to hold that many pieces (hundreds of MB of text).
Optimizer settings follow nanoGPT's GPT-2 reproduction. This is an accelerator recipe: on a
2-core CPU one step of batch 16 x 1024 takes minutes.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.corpus = "text"
  config.tokenizer.kind = "bpe"
  config.tokenizer.vocab_size = 50304
  config.tokenizer.character_coverage = 0.9999
  config.model.n_layer = 12
  config.model.n_head = 12
  config.model.n_embd = 768
  config.model.block_size = 1024
  config.model.dropout = 0.0
  config.model.bias = False
  config.train.batch_size = 16
  config.train.num_steps = 600_000
  config.train.learning_rate = 6e-4
  config.train.min_learning_rate = 6e-5
  config.train.warmup_steps = 2000
  config.train.weight_decay = 0.1
  config.train.beta2 = 0.95
  config.train.eval_every = 1000
  config.train.eval_batches = 50
  config.train.checkpoint_every = 1000
  config.train.log_every = 10
  return config
