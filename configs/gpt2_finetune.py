"""Fine-tune a GPT-2 from transformers on any corpus gpt2jax reads (nanoGPT's Shakespeare
fine-tune, in gpt2jax): a small constant learning rate and few steps.

  python train.py --config=configs/gpt2_finetune.py --config.init_from=gpt2
  python train.py --config=configs/gpt2_finetune.py --config.init_from=gpt2 \
      --config.data.corpus=text --config.data.path=input.txt

init_from is a directory written by transformers' save_pretrained (config.json,
model.safetensors, tokenizer.json); on a machine with internet:
  GPT2LMHeadModel.from_pretrained("gpt2").save_pretrained("gpt2")
  AutoTokenizer.from_pretrained("gpt2").save_pretrained("gpt2")
The checkpoint sets the model's shape and tokenizer (GPT-2's byte-level BPE); the block is
cropped to 256 of GPT-2's 1,024 positions. Defaults: the packaged King James Bible, batch
8 x 256, 100 steps at a constant 3e-5 after 10 warmup steps. Any size works (gpt2-medium ...
gpt2-xl want an accelerator, and --config.mesh.fsdp=-1 to split them across devices).

Measured with a GPT-2 124M saved by transformers (random weights: this machine cannot reach
the Hub) on a 2-core AMD EPYC VM shared with other work: about 20 s a step (100 tokens/s),
so the 100 steps take ~35 minutes there; peak memory (RSS) 14.5 GB for 12 steps with an
evaluation, a sample and a checkpoint. A small model (the README's 4 x 256 example) wants a
larger learning rate, e.g. --config.train.learning_rate=1e-3.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.init_from = ""  # required: --config.init_from=DIR
  config.tokenizer.kind = "hf"  # the checkpoint's own tokenizer.json
  config.data.corpus = "english"
  config.model.block_size = 256
  config.model.dropout = 0.1
  config.train.batch_size = 8
  config.train.num_steps = 100
  config.train.learning_rate = 3e-5
  config.train.min_learning_rate = 3e-5  # constant after warmup, as nanoGPT's fine-tune
  config.train.warmup_steps = 10
  config.train.weight_decay = 0.1
  config.train.eval_every = 25
  config.train.eval_batches = 10
  config.train.checkpoint_every = 25
  config.train.log_every = 5
  config.train.sample_tokens = 100
  config.train.sample_prompt = "And God said"
  return config
