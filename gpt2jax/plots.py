"""Pictures of a run: loss curves (plots/loss.png) and attention heatmaps over a prompt.

Headless: figures are drawn with matplotlib's Agg canvas, never a window. Right-to-left
labels (Hebrew, Arabic) must read right to left: matplotlib 3.11 and later lay text out with
libraqm, which applies the Unicode bidi algorithm itself, so they get the text as it is;
older matplotlib draws characters left to right in the order given, so they get the visual
order computed by python-bidi. A font that has the labels' glyphs is looked for (matplotlib's
own DejaVu Sans covers Hebrew).

On demand: python -m gpt2jax.plots --workdir=runs/hebrew
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gpt2jax import metrics
from gpt2jax.errors import UserError
from gpt2jax.workdir import METRICS_JSONL, PLOTS_DIR, SUMMARY_JSON, load_config, write_atomic

LOSS_PNG = "loss.png"
# Fonts tried, in order, for tick labels; the first that has every glyph is used.
LABEL_FONTS = ("DejaVu Sans", "Noto Sans Hebrew", "Noto Sans", "FreeSans", "Liberation Sans",
               "Arial Unicode MS", "Arial")
# Whitespace tokens made visible on the axes.
VISIBLE_WHITESPACE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"})


def _figure(width: float, height: float):
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height), layout="constrained")


# ---- Loss curves -------------------------------------------------------------------------

def run_title(config, num_params: int | None = None, name: str = "") -> str:
  """The run's name and a one-line summary of its config."""
  m, t, tok = config.model, config.train, config.tokenizer
  vocab = f"BPE {tok.vocab_size:,}" if tok.kind == "bpe" else "char"
  parts = [f"corpus {config.data.corpus}", vocab,
           f"{m.n_layer} layers × {m.n_embd} ({m.n_head} heads), block {m.block_size}",
           f"batch {t.batch_size}, lr {t.learning_rate:g}"]
  if num_params:
    parts.append(f"{num_params / 1e6:.2f}M parameters")
  return (f"{name}: " if name else "") + ", ".join(parts)


def plot_losses(records: Sequence[dict], path: Path, *, title: str, tokens_per_step: int
                ) -> Path:
  """Train and validation loss against step (and tokens seen, top axis); learning rate below."""
  from matplotlib.ticker import EngFormatter

  train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
  val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  eval_train = [(r["step"], r["eval_train_loss"]) for r in records if "eval_train_loss" in r]
  rates = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
  if not (train or val):
    raise UserError(f"No losses to plot: {METRICS_JSONL} has no training records yet.")

  fig = _figure(9, 6.5)
  loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
  if train:
    loss_ax.plot(*zip(*train), color="tab:blue", lw=1.2, label="train (mean over log interval)")
  if eval_train:
    loss_ax.plot(*zip(*eval_train), color="tab:blue", ls="--", marker=".", lw=1, alpha=0.6,
                 label="train (evaluation windows)")
  if val:
    loss_ax.plot(*zip(*val), color="tab:orange", marker="o", ms=4, lw=1.5, label="validation")
  loss_ax.set_ylabel("loss (nats per token)")
  loss_ax.grid(alpha=0.3)
  loss_ax.legend(loc="upper right")
  tokens_axis = loss_ax.secondary_xaxis(
      "top", functions=(lambda s: s * tokens_per_step, lambda n: n / tokens_per_step))
  tokens_axis.set_xlabel("tokens seen")
  tokens_axis.xaxis.set_major_formatter(EngFormatter(sep=""))
  if rates:
    lr_ax.plot(*zip(*rates), color="tab:green", lw=1.2)
  lr_ax.set_ylabel("learning rate")
  lr_ax.set_xlabel("step")
  lr_ax.grid(alpha=0.3)
  lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def write_loss_plot(workdir: str | Path, num_params: int | None = None) -> Path:
  """<workdir>/plots/loss.png from the run's metrics.jsonl and config.json."""
  workdir = Path(workdir)
  config = load_config(workdir)
  if num_params is None:
    summary_path = workdir / SUMMARY_JSON
    if summary_path.exists():
      num_params = json.loads(summary_path.read_text(encoding="utf-8")).get("num_parameters")
  return plot_losses(
      metrics.read_metrics(workdir), workdir / PLOTS_DIR / LOSS_PNG,
      title=run_title(config, num_params, workdir.name),
      tokens_per_step=config.train.batch_size * config.model.block_size)


def _save(fig, path: Path, dpi: int = 100) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=dpi)
  return write_atomic(path, png.getvalue())


# ---- Labels in any script ----------------------------------------------------------------

def visual_order(text: str) -> str:
  """The characters in display order, as the Unicode bidi algorithm lays them out left to
  right (right-to-left runs reversed)."""
  from bidi import get_display

  return get_display(text)


def matplotlib_applies_bidi() -> bool:
  """True when matplotlib reorders bidirectional text itself (libraqm text layout, 3.11+)."""
  from matplotlib import ft2font

  return hasattr(ft2font, "__libraqm_version__")


def label_text(text: str) -> str:
  """The string to hand matplotlib so that the text reads in its own direction: the text
  itself where matplotlib applies the bidi algorithm, else its visual order (reordering
  twice would turn it back to front)."""
  return text if matplotlib_applies_bidi() else visual_order(text)


def token_label(token: str) -> str:
  """A token as an axis label: whitespace made visible, ready for matplotlib."""
  return label_text(token.translate(VISIBLE_WHITESPACE))


def is_right_to_left(text: str) -> bool:
  """True when the text's first strong character is right-to-left (bidi rule P2)."""
  from bidi import get_base_level

  return get_base_level(text) == 1


@functools.lru_cache(maxsize=None)
def _font_charmap(family: str) -> frozenset[int] | None:
  from matplotlib import font_manager, ft2font

  try:
    path = font_manager.findfont(font_manager.FontProperties(family=family),
                                 fallback_to_default=False)
  except ValueError:
    return None
  return frozenset(ft2font.FT2Font(path).get_charmap())


def font_for(texts: Sequence[str], warn: Callable[[str], None] = print) -> str | None:
  """A font family with glyphs for every character of texts; None (after a warning) if none."""
  needed = {ord(c) for text in texts for c in text if not c.isspace()}
  for family in LABEL_FONTS:
    charmap = _font_charmap(family)
    if charmap is not None and needed <= charmap:
      return family
  missing = "".join(sorted({chr(c) for c in needed - (_font_charmap(LABEL_FONTS[0]) or set())}))
  warn(f"warning: no installed font has glyphs for {missing[:20]!r}; those labels will show as "
       "boxes. Install a font that covers them (e.g. `apt-get install fonts-dejavu-core` or "
       "`fonts-noto-core`) and delete matplotlib's font cache (~/.cache/matplotlib).")
  return None


# ---- Attention ---------------------------------------------------------------------------

def attention_maps(model, params, token_ids: Sequence[int]) -> np.ndarray:
  """Softmax attention weights of every layer and head over one sequence, as the model
  computes them (it sows them into the 'intermediates' collection when that is mutable).

  Returns float32 [layers, heads, query, key]: row q holds how much token q attends to each key.
  """
  import jax
  import jax.numpy as jnp

  @jax.jit
  def forward(params, tokens):
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    return state["intermediates"]

  sown = forward(params, jnp.asarray([token_ids], jnp.int32))
  if "h" in sown:  # layers under nn.scan: one stacked entry, layer axis first
    stacked = sown["h"]["attn"]["attention_weights"][0]
  else:
    stacked = jnp.stack([sown[f"h_{i}"]["attn"]["attention_weights"][0]
                         for i in range(model.config.n_layer)])
  return np.asarray(stacked[:, 0], np.float32)  # [layers, heads, query, key] of batch row 0


def attention_figure(weights: np.ndarray, tokens: Sequence[str], *, title: str,
                     heads: Sequence[int], right_to_left: bool = False,
                     warn: Callable[[str], None] = print):
  """Heatmaps of weights [heads, query, key] over the tokens, one panel per head in `heads`.

  right_to_left: the sequence runs from right to left on the x axis (first token on the
  right) and the query labels stand on the right, as a right-to-left reader expects.
  """
  from matplotlib.colors import PowerNorm

  labels = [token_label(t) for t in tokens]
  family = font_for(labels, warn)
  n = len(tokens)
  columns = math.ceil(math.sqrt(len(heads)))
  rows = -(-len(heads) // columns)
  panel = min(max(4.0, 0.25 * n + 1.5), 14.0 if len(heads) == 1 else 7.0)
  fig = _figure(panel * columns + 1.2, panel * rows + 0.8)
  axes = fig.subplots(rows, columns, squeeze=False)
  # A square-root color scale: the weights that matter are often far below the maximum.
  norm = PowerNorm(0.5, vmin=0.0, vmax=float(weights[list(heads)].max()))
  tick_size = float(np.clip(panel * 72 / max(n, 1) * 0.55, 4.0, 11.0))
  image = None
  for i, ax in enumerate(axes.ravel()):
    if i >= len(heads):
      ax.set_visible(False)
      continue
    row, column = divmod(i, columns)
    image = ax.imshow(weights[heads[i]], cmap="viridis", norm=norm, interpolation="nearest")
    if len(heads) > 1:
      ax.set_title(f"head {heads[i]}", fontsize=10)
    outer_column = column == (columns - 1 if right_to_left else 0)
    bottom = i + columns >= len(heads)
    ax.set_xticks(range(n), labels if bottom else [], rotation=90, fontsize=tick_size,
                  family=family)
    ax.set_yticks(range(n), labels if outer_column else [], fontsize=tick_size, family=family)
    if right_to_left:
      ax.invert_xaxis()
      ax.yaxis.tick_right()
      ax.yaxis.set_label_position("right")
    ax.tick_params(length=2, pad=1)
    if bottom:
      ax.set_xlabel("attended-to token (key)" + (", right to left" if right_to_left else ""),
                    fontsize=9)
    if outer_column:
      ax.set_ylabel("attending token (query)", fontsize=9)
  fig.colorbar(image, ax=axes.ravel()[:len(heads)].tolist(), shrink=0.6,
               label="attention weight")
  fig.suptitle(title, fontsize=11)
  return fig


def parse_head(head: str, n_head: int) -> list[int]:
  """--head: a head number (from 0) or 'all'."""
  if head.strip().lower() == "all":
    return list(range(n_head))
  try:
    index = int(head)
  except ValueError:
    index = -1
  if not 0 <= index < n_head:
    raise UserError(f"--head={head!r}: this model has heads 0..{n_head - 1}; give one of them, "
                    "or --head=all for a grid of every head.")
  return [index]


def draw_prompt_attention(loaded: Any, prompt: str, path: str | Path, *, layer: int,
                          head: str, warn: Callable[[str], None] = print) -> Path:
  """Attention heatmap of one layer (one head, or all) over a prompt's tokens.

  loaded: a runs.LoadedModel. The prompt is normalized as the corpus was and encoded as a
  prompt is (after end-of-text, the start-of-document context the model was trained with).
  """
  cfg = loaded.model.config
  if not 0 <= layer < cfg.n_layer:
    raise UserError(f"--layer={layer}: this model has layers 0..{cfg.n_layer - 1}.")
  heads = parse_head(head, cfg.n_head)
  if not str(path).lower().endswith(".png"):
    raise UserError(f"--attention_plot={path}: give a .png file name.")
  text = loaded.normalize_prompt(prompt)
  if not text:
    raise UserError("--attention_plot needs a --prompt to draw the attention over.")
  tokenizer = loaded.tokenizer
  ids = tokenizer.encode_prompt(text)
  if len(ids) > cfg.block_size:
    warn(f"warning: the prompt is {len(ids)} tokens but the model sees {cfg.block_size}: "
         "only the last ones are drawn.")
    ids = ids[-cfg.block_size:]
  weights = attention_maps(loaded.model, loaded.params, ids)[layer]
  which = f"head {heads[0]}" if len(heads) == 1 else "all heads"
  title = f"{loaded.short_name}: layer {layer}, {which}"
  fig = attention_figure(weights, tokenizer.token_strings(ids), title=title, heads=heads,
                         right_to_left=is_right_to_left(text), warn=warn)
  return _save(fig, Path(path), dpi=110)


def _main(argv) -> None:
  from absl import app, flags

  from gpt2jax import cli

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def draw():
    path = write_loss_plot(flags.FLAGS.workdir)
    print(f"wrote {path}")

  cli.run_main(draw, verbose=flags.FLAGS.verbose)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "The run whose plots/loss.png to draw.", required=True)
  flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
  app.run(_main)
