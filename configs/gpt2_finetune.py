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
cropped to 256 of GPT-2's 1,024 positions, which a CPU can afford. Defaults: the packaged King
James Bible, batch 8 x 256, 100 steps at 3e-5. Any size works (gpt2-medium ... gpt2-xl need
an accelerator's memory and --config.mesh.fsdp=-1 across devices).
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
