"""GPT-2 in, GPT-2 out: transformers checkpoints, tokenizer.json files, export.

The reference numbers come from transformers itself (tests/fixtures/make_hf_fixtures.py, run
by hand where torch is installed): a tiny random GPT-2 with every weight perturbed, its
byte-level BPE tokenizer, its logits at full block length and its greedy continuations.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, run_module, run_script, tiny_config
from gpt2jax import export, hf_checkpoint, hf_tokenizer, pretrained, sampling, train_lib
from gpt2jax.errors import UserError
from gpt2jax.metrics import read_metrics
from gpt2jax.model import GPT, GPTConfig

FIXTURES = REPO / "tests" / "fixtures"
TINY_GPT2 = FIXTURES / "hf_gpt2_tiny"
SHARDED_GPT2 = FIXTURES / "hf_gpt2_tiny_sharded"
REFERENCE = json.loads((TINY_GPT2 / "reference.json").read_text(encoding="utf-8"))
TEXTS = ("In the beginning God created the heaven and the earth.",
         "בראשית ברא אלהים את השמים ואת הארץ׃\nויאמר אלהים יהי אור", "mixed שלום world 123!")


def logits_of(loaded, ids) -> np.ndarray:
  logits, _ = jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray(ids))
  return np.asarray(logits)


def copy_fixture(tmp_path, source=TINY_GPT2):
  target = tmp_path / source.name
  shutil.copytree(source, target)
  return target


def edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


# --- import --------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", [TINY_GPT2, SHARDED_GPT2], ids=["single", "sharded"])
def test_imported_gpt2_gives_transformers_logits(directory):
  reference = load_file(str(TINY_GPT2 / "reference.safetensors"))
  loaded = pretrained.load_pretrained(directory)
  assert loaded.model.config.block_size == reference["input_ids"].shape[1] == 64
  difference = np.abs(logits_of(loaded, reference["input_ids"]) - reference["logits"])
  assert difference.max() <= 1e-4, difference.max()


def test_imported_gpt2_continues_greedily_as_transformers_does():
  loaded = pretrained.load_pretrained(TINY_GPT2)
  options = sampling.SamplingOptions(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
  for case in REFERENCE["greedy"]:
    new = sampling.generate(loaded.model, loaded.params, [case["prompt_ids"]], options,
                            eos_id=loaded.tokenizer.eos_id, pad_id=loaded.tokenizer.pad_id)[0]
    assert new == case["new_ids"], case["text"]


def test_scanned_layers_take_the_same_weights(tmp_path):
  reference = load_file(str(TINY_GPT2 / "reference.safetensors"))
  shape = hf_checkpoint.read_shape(TINY_GPT2)
  model = GPT(GPTConfig(vocab_size=shape.vocab_size, block_size=64, scan_layers=True,
                                   **shape.model_fields()))
  params = pretrained._read_params(TINY_GPT2, shape, model)
  logits, _ = model.apply({"params": params}, reference["input_ids"])
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-4)


def test_older_key_names_buffers_and_bfloat16_are_read(tmp_path):
  directory = copy_fixture(tmp_path)
  tensors = load_file(str(directory / "model.safetensors"))
  renamed = {name.removeprefix("transformer."): value.astype(ml_dtypes.bfloat16)
             for name, value in tensors.items()}
  renamed["h.0.attn.bias"] = np.tril(np.ones((64, 64), np.float32))  # an old causal-mask buffer
  save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
  imported = hf_checkpoint.read_tensors(directory)
  assert set(imported) == {name.removeprefix("transformer.") for name in tensors}
  for name, value in tensors.items():
    expected = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(imported[name.removeprefix("transformer.")], expected)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"describes a 'llama' model; gpt2jax loads GPT-2"),
    ({"activation_function": "relu"}, r"activation_function 'relu'"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon 1e-06 \(gpt2jax uses 1e-5\)"),
    ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx true"),
    ({"n_layer": 3}, r"no tensor 'h.2.ln_1.weight'"),
    ({"n_embd": 64}, r"c_attn/bias has shape \(96,\), the model needs \(192,\)"),
])
def test_checkpoints_gpt2jax_would_compute_differently_are_refused(tmp_path, change, message):
  directory = copy_fixture(tmp_path)
  edit_config(directory, **change)
  with pytest.raises(UserError, match=message):
    pretrained.load_pretrained(directory)


def test_a_pickle_is_refused_unopened_and_missing_files_are_named(tmp_path):
  directory = copy_fixture(tmp_path)
  (directory / "model.safetensors").unlink()
  (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
  with pytest.raises(UserError, match=r"holds pytorch_model.bin .*never loads a pickle.*"
                                      r"save_pretrained\('OUT'\) writes OUT/model.safetensors"):
    pretrained.load_pretrained(directory)
  with pytest.raises(UserError, match=r"holds no config.json: it is not a transformers model"):
    pretrained.load_pretrained(tmp_path)
  sharded = copy_fixture(tmp_path, SHARDED_GPT2)
  (sharded / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(UserError, match=r"lists model-00002-of-00003.safetensors, which is missing"):
    pretrained.load_pretrained(sharded)
  (directory / "tokenizer.json").unlink()
  (directory / "model.safetensors").write_bytes((TINY_GPT2 / "model.safetensors").read_bytes())
  with pytest.raises(UserError, match=r"tokenizer.json does not exist"):
    pretrained.load_pretrained(directory)


@pytest.mark.parametrize("bias, tied", [(False, True), (True, False)])
def test_models_without_biases_or_with_an_untied_head_convert_exactly(bias, tied):
  """GPT-2 always has biases (zeros stand in) and may have its own lm_head."""
  cfg = GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias,
                  tie_embeddings=tied)
  ids = np.arange(32).reshape(2, 16) % 70
  params = GPT(cfg).init(jax.random.key(1), ids)["params"]
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)
  tensors = hf_checkpoint.from_params(params, cfg)
  shape = hf_checkpoint.GPT2Shape(vocab_size=70, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  tie_embeddings=tied)
  back = hf_checkpoint.to_params({k.removeprefix("transformer."): v for k, v in tensors.items()},
                                 shape, block_size=16)
  gpt2 = GPT(GPTConfig(vocab_size=70, block_size=16, **shape.model_fields()))
  np.testing.assert_allclose(gpt2.apply({"params": back}, ids)[0],
                             GPT(cfg).apply({"params": params}, ids)[0], atol=1e-5)


# --- tokenizer.json ------------------------------------------------------------------------

def test_tokenizer_json_gives_transformers_ids_and_round_trips():
  tokenizer = hf_tokenizer.HFTokenizer.from_path(TINY_GPT2)
  assert (tokenizer.eos_id, tokenizer.vocab_size) == (REFERENCE["eos_id"], 512)
  for case in REFERENCE["encodings"]:
    assert tokenizer.encode_prompt(case["text"]) == case["ids"], case["text"]
    assert tokenizer.decode(case["ids"]) == case["decoded"]
  for text in TEXTS:  # byte-level BPE: any text comes back exactly
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.encode_prompt("") == [tokenizer.eos_id]


def test_end_of_text_comes_from_the_file_or_the_config(tmp_path):
  file = tmp_path / "tokenizer.json"
  file.write_text((TINY_GPT2 / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
  assert hf_tokenizer.HFTokenizer.from_path(file).eos_id == 511  # by its name, no config
  data = json.loads(file.read_text(encoding="utf-8"))
  data["added_tokens"][0]["content"] = "<stop>"
  data["model"]["vocab"]["<stop>"] = data["model"]["vocab"].pop("<|endoftext|>")
  data["added_tokens"].append({**data["added_tokens"][0], "id": 512, "content": "<start>"})
  file.write_text(json.dumps(data), encoding="utf-8")
  with pytest.raises(UserError, match=r"cannot tell which token ends a text \(special tokens: "
                                      r"\['<stop>', '<start>'\]\): set --config.tokenizer.eos"):
    hf_tokenizer.HFTokenizer.from_path(file)
  assert hf_tokenizer.HFTokenizer.from_path(file, eos_token="<stop>").eos_id == 511


def test_a_saved_dataset_and_a_tokenizer_json_train_a_model_with_a_padded_vocabulary(
    tmp_path, tiny_text_file):
  import datasets
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train([str(tiny_text_file)], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  stories = tiny_text_file.read_text(encoding="utf-8").split("\n\n")
  datasets.Dataset.from_dict({"text": stories}).save_to_disk(str(tmp_path / "stories"))
  config = tiny_config(tokenizer__kind="hf", tokenizer__path=str(tmp_path / "tokenizer.json"),
                       data__corpus="hf", data__hf_path=str(tmp_path / "stories"),
                       train__num_steps=20, train__eval_every=20, train__checkpoint_every=20)
  train_lib.train_and_evaluate(config, tmp_path / "run")
  loaded = sampling.load_model(tmp_path / "run")
  assert (loaded.tokenizer.vocab_size, loaded.model.config.vocab_size) == (300, 320)
  evals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
  assert evals[-1] < evals[0] - 0.5
  # Untrained rows 300..319 never come out, even when they are the likeliest.
  params = jax.tree.map(lambda x: x, loaded.params)
  params["wte"]["embedding"] = params["wte"]["embedding"].at[300:].set(10.0)
  options = sampling.SamplingOptions(max_new_tokens=30, temperature=1.0, stop_at_eos=False)
  for use_cache in (True, False):
    new = sampling.generate(loaded.model, params, [[loaded.tokenizer.eos_id]], options,
                            eos_id=loaded.tokenizer.eos_id, pad_id=loaded.tokenizer.pad_id,
                            use_cache=use_cache, vocab_size=300)[0]
    assert len(new) == 30 and max(new) < 300


# --- export --------------------------------------------------------------------------------

def exported_and_back(tmp_path, workdir):
  loaded = sampling.load_model(workdir)
  report = export.export_run(loaded, tmp_path / "exported")
  return loaded, report, pretrained.load_pretrained(tmp_path / "exported")


def assert_same_model(ours, back, texts):
  for text in texts:
    ids = ours.tokenizer.encode_prompt(ours.normalize_prompt(text))
    assert back.tokenizer.encode_prompt(text) == ids, text  # transformers' tokenizer(text)
    np.testing.assert_array_equal(logits_of(back, [ids]), logits_of(ours, [ids]))
  options = sampling.SamplingOptions(max_new_tokens=12, temperature=0.0)
  greedy = lambda loaded, ids: sampling.generate(
      loaded.model, loaded.params, [ids], options, eos_id=loaded.tokenizer.eos_id,
      pad_id=loaded.tokenizer.pad_id, vocab_size=loaded.tokenizer.vocab_size)[0]
  ids = ours.tokenizer.encode_prompt(ours.normalize_prompt(texts[0]))
  assert greedy(back, ids) == greedy(ours, ids)


def test_a_char_run_exports_and_imports_back_the_same(tmp_path, trained_workdir):
  ours, report, back = exported_and_back(tmp_path, trained_workdir)
  assert report.tensors == 28 and report.texts_checked > 10
  assert sorted(p.name for p in report.out.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
      "tokenizer_config.json"]
  assert json.loads((report.out / "config.json").read_text())["n_positions"] == 32
  assert_same_model(ours, back, ["ROMEO 1: שלום עולם", "JULIET: hello"])


def test_a_bpe_run_with_hebrew_marks_stripped_exports_the_same(tmp_path, tiny_text_file):
  config = tiny_config(tiny_text_file, tokenizer__kind="bpe", tokenizer__vocab_size=600,
                       data__corpus="text+hebrew", train__num_steps=10, train__eval_every=10,
                       train__checkpoint_every=10, train__sample_tokens=0)
  train_lib.train_and_evaluate(config, tmp_path / "run")
  ours, report, back = exported_and_back(tmp_path, tmp_path / "run")
  assert report.texts_checked > 100  # the hard cases and the validation documents
  # Pointed Hebrew: the exported tokenizer strips the marks as gpt2jax strips a prompt's.
  assert_same_model(ours, back, ["בְּרֵאשִׁית בָּרָא", "ROMEO: hello   world\n\n", "a\u2581b 😀"])


def test_export_writes_nothing_when_a_check_fails_and_never_overwrites(tmp_path, trained_workdir,
                                                                     monkeypatch):
  loaded = sampling.load_model(trained_workdir)
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match=r"already exists: choose a new directory"):
    export.export_run(loaded, tmp_path / "taken")
  monkeypatch.setattr(hf_tokenizer, "export_differences", lambda *a: ["'x': ids differ"])
  with pytest.raises(UserError, match=r"cannot be written as a tokenizer.json .* nothing was "):
    export.export_run(loaded, tmp_path / "new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --- fine-tuning ---------------------------------------------------------------------------

def finetune_config(**overrides):
  config = tiny_config(data__corpus="english", init_from=str(TINY_GPT2), model__block_size=32,
                       model__dropout=0.1, train__learning_rate=1e-3, train__warmup_steps=2,
                       train__num_steps=30, train__decay_steps=30, train__eval_every=15,
                       train__checkpoint_every=15, train__log_every=5, train__sample_tokens=8)
  for key, value in overrides.items():
    config.train[key] = value
  return config


def test_finetuning_a_gpt2_lowers_its_loss_resumes_exactly_and_samples(tmp_path, monkeypatch,
                                                                       capsys):
  from gpt2jax import preemption

  config = finetune_config()
  with monkeypatch.context() as patch:  # a stop request (SIGTERM) arrives during step 12
    patch.setattr(preemption.StopRequests, "should_stop", lambda self, step: step == 12)
    train_lib.train_and_evaluate(config, tmp_path / "run")
  out = capsys.readouterr().out
  assert "init_from=" in out and "model.n_head=4" in out and "tokenizer.kind='hf'" in out
  assert "starting from " + str(TINY_GPT2) in out
  resumed = train_lib.train_and_evaluate(config, tmp_path / "run")
  straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                  jax.tree_util.tree_leaves(straight.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  evals = [r for r in read_metrics(tmp_path / "straight") if "val_loss" in r]
  assert evals[0]["step"] == 0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
  # Step 0 is the imported model itself: its loss is not a random model's ln(512) = 6.24.
  first = pretrained.load_pretrained(TINY_GPT2)
  assert abs(evals[0]["val_loss"] - np.log(512)) > 0.5
  assert first.model.config.vocab_size == 512
  loaded = sampling.load_model(tmp_path / "run")
  assert loaded.tokenizer.kind == "hf" and loaded.model.config.block_size == 32
  text = sampling.complete_prompts(loaded, ["And God said"], sampling.SamplingOptions(
      max_new_tokens=10, temperature=0.0))[0]
  assert text.startswith("And God said") and len(text) > len("And God said")
  # Out again: GPT-2's own tokenizer.json (with the corpus's NFC before it) and the new weights.
  ours, report, back = exported_and_back(tmp_path, tmp_path / "run")
  assert back.model.config.vocab_size == 512 and back.model.config.block_size == 32
  assert_same_model(ours, back, ["And God said", "בראשית ברא"])


def test_init_from_refuses_a_block_longer_than_the_checkpoints_positions(tmp_path):
  config = finetune_config()
  config.model.block_size = 128
  with pytest.raises(UserError, match=r"block_size=128 is longer than the 64 positions"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


# --- the commands --------------------------------------------------------------------------

def test_the_commands_take_init_from_and_export(tmp_path, trained_workdir):
  sample = run_script("sample.py", f"--init_from={TINY_GPT2}", "--prompt=In the beginning",
                      "--temperature=0", "--max_new_tokens=8")
  assert sample.returncode == 0, sample.stderr
  assert sample.stdout.startswith("In the beginning")
  text_file = tmp_path / "text.txt"
  text_file.write_text(REFERENCE["encodings"][0]["text"])  # 20 tokens
  scored = run_module("gpt2jax.evaluate", f"--init_from={TINY_GPT2}",
                      f"--text_file={text_file}", "--json")
  assert scored.returncode == 0, scored.stderr
  assert json.loads(scored.stdout)["tokens"] == 20
  plot = run_script("sample.py", f"--init_from={TINY_GPT2}", "--prompt=In the beginning",
                    f"--attention_plot={tmp_path / 'attention.png'}", "--layer=1")
  assert plot.returncode == 0, plot.stderr
  assert (tmp_path / "attention.png").stat().st_size > 1000
  both = run_script("sample.py", f"--init_from={TINY_GPT2}", f"--workdir={trained_workdir}")
  assert both.returncode == 1 and "leave out --workdir and --step" in both.stderr
  exported = run_module("gpt2jax.export", f"--workdir={trained_workdir}",
                        f"--out={tmp_path / 'hf'}")
  assert exported.returncode == 0, exported.stderr
  assert "tensors read back equal" in exported.stdout
  assert (tmp_path / "hf" / "model.safetensors").exists()


FSDP_IMPORT_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import tiny_config
from gpt2jax import hf_checkpoint, parallel, pretrained, steps
from gpt2jax.model import GPT, GPTConfig

config, _ = pretrained.resolve_config(tiny_config(init_from={checkpoint!r}, model__block_size=64))
config.mesh.data, config.mesh.fsdp = 2, 4
model = GPT(GPTConfig.from_config(config.model, config.model.vocab_size))
sharded = steps.make_sharded_steps(config, model, parallel.make_mesh(config.mesh))
params = pretrained.initial_params(config, model, sharded.abstract_state.params)
tensors = hf_checkpoint.read_tensors({checkpoint!r})
wte = params["wte"]["embedding"]
print(json.dumps({{
    "spec": list(wte.sharding.spec), "shard": list(wte.addressable_shards[0].data.shape),
    "wte_equal": bool(np.array_equal(np.asarray(wte), tensors["wte.weight"])),
    "c_fc_equal": bool(np.array_equal(np.asarray(params["h_1"]["mlp"]["c_fc"]["kernel"]),
                                      tensors["h.1.mlp.c_fc.weight"]))}}))
"""


def test_imported_weights_are_placed_sharded_over_an_fsdp_mesh():
  script = FSDP_IMPORT_SCRIPT.format(tests=str(REPO / "tests"), checkpoint=str(TINY_GPT2))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out == {"spec": [None, "fsdp"], "shard": [512, 8], "wte_equal": True,
                 "c_fc_equal": True}
