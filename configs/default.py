"""Defaults shared by every recipe; each recipe in configs/ starts from these.

Every value can be overridden on the command line, e.g. `--config.model.n_layer=4`.
The keys under seed, model, tokenizer, data and train are the public contract.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A transformers GPT-2 directory (config.json + model.safetensors + tokenizer.json) to start
  # from: its weights, model shape and tokenizer replace the random start (see README).
  config.init_from = ""

  config.model = ml_collections.ConfigDict()
  config.model.n_layer = 4
  config.model.n_head = 4
  config.model.n_embd = 256
  config.model.block_size = 128
  config.model.dropout = 0.1
  config.model.bias = True
  config.model.tie_embeddings = True
  config.model.dtype = "float32"  # matmul operands: float32, bfloat16 or auto (bf16 where fast)
  config.model.remat = False  # rematerialise blocks in the backward pass
  config.model.scan_layers = False  # layers under lax.scan: compile time independent of depth
  # Ids the model's embedding holds; 0: the tokenizer's vocabulary (a tokenizer.json's rounded
  # up to a multiple of 64). Set from the checkpoint with init_from.
  config.model.vocab_size = 0

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.kind = "bpe"  # 'bpe' (SentencePiece), 'char', or 'hf' (a tokenizer.json)
  config.tokenizer.path = ""  # kind 'hf': a tokenizer.json or a directory holding one
  config.tokenizer.eos_token = ""  # kind 'hf': end-of-text token; "": from the file
  config.tokenizer.vocab_size = 4000  # BPE only; char vocabularies are sized by the corpus
  config.tokenizer.character_coverage = 1.0
  config.tokenizer.input_sentence_size = 2_000_000  # lines sampled to train the BPE model
  config.tokenizer.sample_characters = 100_000_000  # and at most this many characters

  config.data = ml_collections.ConfigDict()
  # 'text' reads data.path (a file, a directory or a glob); 'hebrew' and 'english' are the
  # packaged offline corpora; several joined with '+' ('hebrew+english') share one tokenizer.
  config.data.corpus = "text"
  config.data.path = ""  # local or gs://
  # 'tfds' reads a TensorFlow Datasets dataset as array_record (see gpt2jax/data/tfds_source.py).
  config.data.tfds = ""  # e.g. 'tiny_shakespeare', 'wiki40b/he', 'lm1b'
  config.data.tfds_split = "train"  # '+' joins splits, e.g. 'train+validation'
  config.data.tfds_text_field = "text"
  config.data.tfds_data_dir = ""  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.tfds_manual_dir = ""  # offline source files; default <data_dir>/downloads/manual
  # 'hf' reads a Hugging Face `datasets` dataset (see gpt2jax/data/hf_source.py).
  config.data.hf_path = ""  # a local save_to_disk directory, or a Hub name (needs internet)
  config.data.hf_split = "train"  # of a DatasetDict; '+' joins splits, e.g. 'train+validation'
  config.data.hf_text_field = "text"
  config.data.separator = "\n\n"  # splits a text file into documents; "" keeps each file whole
  config.data.keep_niqqud = False  # Hebrew: keep vowel points and cantillation marks
  config.data.val_fraction = 0.1
  config.data.shuffle_documents = True  # before the split, so validation is a random sample

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32  # sequences per update, over all devices and micro-batches
  config.train.grad_accum_steps = 1  # micro-batches of batch_size / grad_accum_steps each
  config.train.num_steps = 2000
  config.train.optimizer = "adamw"  # or "muon": Muon on the blocks' kernels, AdamW on the rest
  config.train.learning_rate = 1e-3  # AdamW's peak (with muon: embeddings, biases, LayerNorms)
  config.train.min_learning_rate = 1e-4
  config.train.muon_learning_rate = 0.02  # Muon's peak, same warmup and cosine (optimizer=muon)
  config.train.muon_momentum = 0.95  # Muon's Nesterov momentum (optimizer=muon)
  config.train.warmup_steps = 100
  config.train.decay_steps = -1  # cosine decay ends here; -1 means num_steps
  config.train.weight_decay = 0.1
  config.train.beta1 = 0.9
  config.train.beta2 = 0.99
  config.train.grad_clip = 1.0
  config.train.skip_nonfinite = False  # skip a NaN/inf update instead of stopping the run
  config.train.eval_every = 250
  config.train.eval_batches = 20
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 3
  config.train.log_every = 50
  config.train.sample_tokens = 200  # length of the sample printed at each evaluation
  config.train.sample_prompt = ""  # "" starts samples from end-of-text
  config.train.sample_temperature = 0.8
  config.train.sample_top_k = 40

  # Device mesh: how many devices split the batch (data: replicated parameters; fsdp:
  # parameters and optimizer state sharded too). -1 takes all remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  return config
