"""nanoGPT's shakespeare-char recipe: a character-level model of Tiny Shakespeare.

  python train.py --config=configs/shakespeare_char.py

reads Tiny Shakespeare from TFDS (downloaded and prepared once, no TensorFlow needed).
Offline, or to train on another file, give the text itself:

  python train.py --config=configs/shakespeare_char.py --config.data.path=input.txt

6 layers, 6 heads, n_embd 384, block 256, dropout 0.2, batch 64, 5000 steps (as nanoGPT).
That is hours on a 2-core CPU; for a quick look there, add
  --config.train.num_steps=300 --config.train.batch_size=16
which took 17 min on a 2-core Xeon VM (1,340 tokens/s) to a validation loss of 2.40 (from
4.25): word-shaped lines, not yet words. configs/shakespeare_char_cpu.py is the small,
fast char-level recipe (val loss ~1.87 in 2,000 steps, about 2 minutes).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.n_layer = 6
  config.model.n_head = 6
  config.model.n_embd = 384
  config.model.block_size = 256
  config.model.dropout = 0.2
  config.model.bias = False
  config.tokenizer.kind = "char"
  config.data.corpus = "tfds"
  config.data.tfds = "tiny_shakespeare"
  config.data.tfds_split = "train+validation+test"  # the whole text, in order
  config.data.shuffle_documents = False  # so validation is the last 10%, as in nanoGPT
  config.data.separator = ""  # with data.path: the whole file is one document
  config.train.batch_size = 64
  config.train.num_steps = 5000
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.eval_every = 250
  config.train.eval_batches = 20
  config.train.checkpoint_every = 250
  config.train.log_every = 10
  config.train.sample_prompt = "\n"
  return config
