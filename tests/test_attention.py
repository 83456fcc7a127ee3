"""Attention heatmaps: weights from the model itself, Hebrew labels in visual order (issue #5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script
from gpt2jax import plots, sampling
from gpt2jax.errors import UserError
from gpt2jax.model import GPT, GPTConfig
from test_report import png_size


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_weights_are_causal_distributions(scan_layers):
  config = GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=3, n_embd=24,
                     scan_layers=scan_layers)
  model = GPT(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  weights = plots.attention_maps(model, params, [1, 5, 7, 2, 9, 9, 4, 3, 11, 0])
  assert weights.shape == (2, 3, 10, 10)  # [layers, heads, query, key]
  above_diagonal = np.triu(np.ones((10, 10), bool), k=1)
  assert np.all(weights[..., above_diagonal] == 0.0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert np.all(weights[..., ~above_diagonal] > 0.0)


def test_hebrew_labels_are_given_to_matplotlib_in_visual_order():
  assert plots.visual_label("שלום") == "םולש"
  assert plots.token_label(" שלום") == "םולש\u2423"  # the space leads on the right
  assert plots.token_label("hello world") == "hello\u2423world"
  assert plots.is_right_to_left("ויאמר אלהים") and not plots.is_right_to_left("And God")

  tokens = ["</s>", "שלום", " עולם", "\n"]
  weights = np.tril(np.ones((1, 4, 4), np.float32))
  weights /= weights.sum(-1, keepdims=True)
  fig = plots.attention_figure(weights, tokens, title="t", heads=[0], right_to_left=True)
  ax = fig.axes[0]
  expected = ["</s>", "םולש", "םלוע\u2423", "\u21b5"]
  assert [t.get_text() for t in ax.get_xticklabels()] == expected
  assert [t.get_text() for t in ax.get_yticklabels()] == expected
  assert ax.xaxis_inverted()  # the first token stands on the right
  assert ax.get_xticklabels()[1].get_fontfamily() == ["DejaVu Sans"]


def test_a_missing_font_gives_a_clear_warning(monkeypatch):
  monkeypatch.setattr(plots, "LABEL_FONTS", ("DejaVu Sans",))
  warnings = []
  assert plots.font_for(["שלום"], warn=warnings.append) == "DejaVu Sans"
  assert warnings == []
  assert plots.font_for(["漢字"], warn=warnings.append) is None
  assert len(warnings) == 1 and "no installed font has glyphs" in warnings[0]


def test_attention_plot_of_one_head(trained_workdir, tmp_path):
  loaded = sampling.load_model(trained_workdir)
  path = plots.draw_prompt_attention(loaded, "JULIET: ויאמר", tmp_path / "attn.png", layer=1,
                                     head="1")
  width, height = png_size(path)
  assert 400 <= width <= 2500 and 400 <= height <= 2500
  with pytest.raises(UserError, match=r"heads 0..1"):
    plots.draw_prompt_attention(loaded, "JULIET", tmp_path / "x.png", layer=0, head="2")
  with pytest.raises(UserError, match=r"layers 0..1"):
    plots.draw_prompt_attention(loaded, "JULIET", tmp_path / "x.png", layer=2, head="all")


def test_sample_script_draws_every_head_of_a_layer(trained_workdir, tmp_path):
  result = run_script("sample.py", f"--workdir={trained_workdir}", "--prompt=ויאמר אלהים",
                      f"--attention_plot={tmp_path / 'attn.png'}", "--layer=0", "--head=all")
  assert result.returncode == 0, result.stderr
  assert "attn.png" in result.stdout
  width, height = png_size(tmp_path / "attn.png")
  assert width > height  # two heads side by side
  bad = run_script("sample.py", f"--workdir={trained_workdir}", "--prompt=JULIET",
                   f"--attention_plot={tmp_path / 'bad.png'}", "--layer=7")
  assert bad.returncode == 1 and "layers 0..1" in bad.stderr and "Traceback" not in bad.stderr
