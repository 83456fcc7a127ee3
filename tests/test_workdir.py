"""gpt2jax.workdir: atomic writes, config.json, the shape check of a resumed run, the lock."""

import ml_collections
import pytest

from gpt2jax import workdir as workdir_lib
from gpt2jax.errors import UserError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "tokens.json"
  workdir_lib.write_atomic(path, "old ✓")
  with pytest.raises(RuntimeError):
    with workdir_lib.atomic_path(path) as tmp:
      tmp.write_text("half", encoding="utf-8")
      raise RuntimeError("killed mid-write")
  assert path.read_text(encoding="utf-8") == "old ✓"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]
  workdir_lib.write_atomic(path, b"\x00new")
  assert path.read_bytes() == b"\x00new"


def test_config_round_trips_through_config_json(tmp_path):
  config = ml_collections.ConfigDict({"data": {"sample_prompt": "בראשית"}, "seed": 3})
  workdir_lib.save_config(tmp_path, config)
  assert workdir_lib.load_config(tmp_path).to_dict() == config.to_dict()
  assert "בראשית" in (tmp_path / workdir_lib.CONFIG_JSON).read_text(encoding="utf-8")
  with pytest.raises(UserError, match="holds no config.json: is it a gpt2jax workdir"):
    workdir_lib.load_config(tmp_path / "elsewhere")


def _config(**model):
  return ml_collections.ConfigDict({
      "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "bias": True,
                "tie_embeddings": True, "scan_layers": False, "vocab_size": 0, **model},
      "tokenizer": {"kind": "char", "vocab_size": 256}})


def test_only_a_config_of_the_same_shape_may_resume(tmp_path):
  workdir_lib.save_config(tmp_path, _config(vocab_size=70))
  workdir_lib.check_resumable(tmp_path, _config(), has_checkpoints=True)  # 0: the tokenizer's
  workdir_lib.check_resumable(tmp_path, _config(n_layer=4), has_checkpoints=False)
  assert workdir_lib.shape_differences(_config(), _config(n_layer=4, bias=False)) == [
      "model.n_layer: 2 -> 4", "model.bias: True -> False"]
  with pytest.raises(UserError, match=r"checkpoints of a differently shaped model "
                                      r"\(model.n_layer: 2 -> 4\)"):
    workdir_lib.check_resumable(tmp_path, _config(n_layer=4), has_checkpoints=True)


def test_the_lock_admits_one_holder_at_a_time(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):
    with pytest.raises(UserError, match=r"in use by another training run \(pid \d+\)"):
      with workdir_lib.WorkdirLock(tmp_path):
        pass
  with workdir_lib.WorkdirLock(tmp_path):  # released on exit
    pass
