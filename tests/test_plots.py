"""gpt2jax/plots.py: loss curves, and attention heatmaps with weights from the model itself
and Hebrew labels in visual order (issue #5)."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module, run_script
from gpt2jax import plots, runs
from gpt2jax.errors import UserError
from gpt2jax.model import GPT, GPTConfig


def png_size(path) -> tuple[int, int]:
  """(width, height) of a PNG file; fails when the file is not a PNG."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


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


def test_labels_are_given_to_matplotlib_so_that_hebrew_reads_right_to_left(monkeypatch):
  # Matplotlib without bidi layout draws characters in the order given: it needs the visual
  # order. Matplotlib that applies bidi itself (3.11+) needs the text as it is.
  monkeypatch.setattr(plots, "matplotlib_applies_bidi", lambda: False)
  assert plots.token_label("שלום") == "םולש"
  assert plots.token_label(" שלום") == "םולש\u2423"  # the leading space stands on the right
  assert plots.token_label("hello world") == "hello\u2423world"
  monkeypatch.setattr(plots, "matplotlib_applies_bidi", lambda: True)
  assert plots.token_label(" שלום") == "\u2423שלום"
  assert plots.is_right_to_left("ויאמר אלהים") and not plots.is_right_to_left("And God")


def ink_columns_of_top_and_bottom(fig, text):
  """Mean x of the dark pixels in the top and in the bottom 15% of a drawn text's ink."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  box = text.get_window_extent(canvas.get_renderer())
  ink = np.asarray(canvas.buffer_rgba())[..., :3].max(-1) < 100  # [rows from the top, cols]
  height = ink.shape[0]
  crop = ink[int(height - box.y1):int(np.ceil(height - box.y0)), int(box.x0):int(box.x1) + 1]
  rows = np.flatnonzero(crop.any(1))
  band = max(1, int(0.15 * (rows[-1] - rows[0])))
  columns = np.arange(crop.shape[1])
  top = crop[rows[0]:rows[0] + band].any(0)
  bottom = crop[rows[-1] - band + 1:rows[-1] + 1].any(0)
  return columns[top].mean(), columns[bottom].mean()


def test_hebrew_labels_are_drawn_right_to_left():
  # In "לך" the lamed rises above the line and the final kaf hangs below it. Read right to
  # left, the lamed comes first: its ink must lie to the right of the kaf's.
  weights = np.array([[[1.0, 0.0], [0.5, 0.5]]], np.float32)
  fig = plots.attention_figure(weights, ["</s>", "לך"], title="t", heads=[0],
                               right_to_left=True)
  fig.set_dpi(300)
  ax = fig.axes[0]
  label = ax.get_yticklabels()[1]
  assert label.get_fontfamily() == ["DejaVu Sans"]
  lamed_x, kaf_x = ink_columns_of_top_and_bottom(fig, label)
  assert lamed_x > kaf_x
  assert ax.xaxis_inverted()  # and the first token stands on the right


def test_a_missing_font_gives_a_clear_warning(monkeypatch):
  monkeypatch.setattr(plots, "LABEL_FONTS", ("DejaVu Sans",))
  warnings = []
  assert plots.font_for(["שלום"], warn=warnings.append) == "DejaVu Sans"
  assert warnings == []
  assert plots.font_for(["漢字"], warn=warnings.append) is None
  assert len(warnings) == 1 and "no installed font has glyphs" in warnings[0]


def test_attention_plot_of_one_head(trained_workdir, tmp_path):
  loaded = runs.load_model(trained_workdir)
  path = plots.draw_prompt_attention(loaded, "JULIET: ויאמר", tmp_path / "attn.png", layer=1,
                                     head="1")
  width, height = png_size(path)
  assert 400 <= width <= 2500 and 400 <= height <= 2500
  with pytest.raises(UserError, match=r"heads 0..1"):
    plots.draw_prompt_attention(loaded, "JULIET", tmp_path / "x.png", layer=0, head="2")
  with pytest.raises(UserError, match=r"layers 0..1"):
    plots.draw_prompt_attention(loaded, "JULIET", tmp_path / "x.png", layer=2, head="all")


@pytest.mark.slow
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


def test_training_draws_a_loss_plot_of_sane_size(trained_workdir):
  width, height = png_size(trained_workdir / "plots" / "loss.png")
  assert 600 <= width <= 2000 and 400 <= height <= 2000


@pytest.mark.slow
def test_the_plots_command_draws_the_loss_plot_of_a_workdir(trained_workdir, tmp_path):
  (tmp_path / "w").mkdir()
  for name in ("config.json", "metrics.jsonl"):
    (tmp_path / "w" / name).write_bytes((trained_workdir / name).read_bytes())
  result = run_module("gpt2jax.plots", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 0, result.stderr
  assert png_size(tmp_path / "w" / "plots" / "loss.png")[0] >= 600


def test_loss_plot_refuses_a_run_without_records(tmp_path):
  with pytest.raises(UserError, match="no training records"):
    plots.plot_losses([], tmp_path / "loss.png", title="x", tokens_per_step=1)
