"""nanoGPT's README recipe for a CPU: a small character-level Tiny Shakespeare model.

  python train.py --config=configs/shakespeare_char_cpu.py --config.data.path=input.txt

The same run as nanoGPT's
  python train.py config/train_shakespeare_char.py --device=cpu --compile=False
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
      --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
first 90% of the text for training, last 10% for validation; 4 layers, 4 heads, n_embd 128,
block 64, batch 12, biases, no dropout; 2000 steps of AdamW (lr 1e-3, beta2 0.99, weight
decay 0.1, clip 1.0), 100 warmup steps then cosine decay to 1e-4 at step 2000; evaluation
every 250 steps on 20 batches, a checkpoint at each. model.dtype=auto: bfloat16 matmul
operands (float32 accumulation, parameters and everything else float32) on CPUs with bfloat16
instructions (AVX512_BF16 or AMX), TPUs and recent GPUs, float32 elsewhere;
--config.model.dtype=float32 is nanoGPT's own CPU numerics. Like nanoGPT's it prints no samples
(set --config.train.sample_tokens=200 for one at every evaluation). It reaches a validation
loss of about 1.87 at step 2000; README, "Performance", has its wall time.

With --config.train.optimizer=muon (Muon on the blocks' kernels, muon_learning_rate 0.02) the
same 2000 steps reach a validation loss of 1.60, and AdamW's 1.87 by step 850; its step is
about 1.8x slower on this small model in float32, so its time to that loss is about 0.75x AdamW's
(README, "Performance", "Muon"). The recipe keeps AdamW, as nanoGPT's does.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.n_layer = 4
  config.model.n_head = 4
  config.model.n_embd = 128
  config.model.block_size = 64
  config.model.dropout = 0.0
  config.model.bias = True
  config.model.dtype = "auto"  # bfloat16 matmuls where the hardware runs them fast
  config.tokenizer.kind = "char"
  config.data.corpus = "text"
  config.data.separator = ""  # the whole file is one document
  config.data.shuffle_documents = False  # first 90% train, last 10% validation
  config.data.val_fraction = 0.1
  config.train.batch_size = 12
  config.train.num_steps = 2000
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.decay_steps = 2000
  config.train.weight_decay = 0.1
  config.train.beta1 = 0.9
  config.train.beta2 = 0.99
  config.train.grad_clip = 1.0
  config.train.eval_every = 250
  config.train.eval_batches = 20
  config.train.checkpoint_every = 250
  config.train.log_every = 50
  config.train.sample_tokens = 0
  return config
