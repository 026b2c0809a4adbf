"""The pictures, checked as images: their size, that they are not blank, and for the attention map
that every masked cell is drawn as masked and every other cell in the colour of its weight."""
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from tfd_jax import ops, viz
from tfd_jax.models import GPTConfig
from tfd_jax.tokenizers.bpe import train_trace

DPI = 80


def _pixels(fig):
    img = viz.to_rgba_array(fig, dpi=DPI)
    w, h = fig.get_size_inches()
    assert img.shape == (round(h * DPI), round(w * DPI), 4)  # the size the figure asks for
    return img


def _not_blank(img, min_colours=20):
    rgb = img[..., :3].reshape(-1, 3)
    colours = len(np.unique(rgb, axis=0))
    non_white = np.mean(np.any(rgb < 245, axis=1))
    assert colours >= min_colours and non_white > 0.03, (colours, non_white)


def _cell_pixel(fig, ax, img, col, row, dx=-0.3, dy=-0.3):
    """The RGB of the image at data point (col + dx, row + dy): near a cell's corner, away from its text."""
    x, y = ax.transData.transform((col + dx, row + dy))
    return img[int(round(img.shape[0] - y)), int(round(x)), :3].astype(float) / 255


def test_attention_map_draws_masked_cells_grey_and_the_others_in_their_weights_colour():
    T, H = 5, 2
    q, k = jax.random.normal(jax.random.key(0), (2, 1, T, H, 4))
    mask = ops.causal_mask(T)
    weights = np.asarray(ops.attention_weights(q, k, mask))
    tokens = ["I", "love", "hot", "pizza", "!"]
    fig = viz.attention_map(weights, tokens, mask=mask)
    img = _pixels(fig)
    _not_blank(img)
    grey = np.asarray(to_rgba(viz.MASKED_COLOR)[:3])
    cmap = matplotlib.colormaps[viz.CMAP]
    axes = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(axes) == H
    for h, ax in enumerate(axes):
        for t in range(T):
            for s in range(T):
                got = _cell_pixel(fig, ax, img, s, t)
                if s > t:
                    assert np.abs(got - grey).max() < 0.02, (h, t, s, got)
                else:
                    want = np.asarray(cmap(weights[0, h, t, s])[:3])
                    assert np.abs(got - want).max() < 0.03, (h, t, s, got, want)
                    assert np.abs(got - grey).max() > 0.05  # no allowed cell looks masked
    fig_full = viz.attention_map(weights[0, 0])  # [T, S] alone, no mask: nothing is grey
    img = _pixels(fig_full)
    ax = next(a for a in fig_full.axes if a.get_title() == "head 0")
    assert all(np.abs(_cell_pixel(fig_full, ax, img, s, t) - grey).max() > 0.05 for t in range(T) for s in range(T))


def test_attention_map_refuses_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not broadcast"):
        viz.attention_map(np.ones((2, 3, 3)) / 3, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="token labels"):
        viz.attention_map(np.ones((3, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="must be"):
        viz.attention_map(np.ones(3))


def test_every_other_picture_has_its_size_and_is_not_blank():
    records = [{"step": s, "loss": 4.0 / s ** 0.3, "lr": 1e-3 * min(1, s / 5), "grad_norm": 1.0 / s,
                "reward": 0.1 * s, "kl": 0.05 * s, "kl_coef": 0.1 + 0.001 * s, "entropy": 2.0 - 0.01 * s,
                **({"val_loss": 4.2 / s ** 0.3} if s % 5 == 0 else {})} for s in range(1, 31)]
    logits = jnp.array([2.0, 1.5, 0.3, -0.5, -1.0, -2.0])
    figures = {
        "bpe": viz.bpe_merge_table(train_trace("low lower lowest newer newest " * 20, 8)),
        "waves": viz.positional_waves(6, 48),
        "heatmap": viz.positional_heatmap(32, 16),
        "masks": viz.mask_patterns({"encoder": np.ones((4, 4), bool), "decoder": ops.causal_mask(4)}),
        "sampling": viz.sampling_distributions(logits, list("abcdef"), temperatures=(0.5, 1.0), top_ps=(1.0, 0.8)),
        "kv": viz.kv_cache_memory({"gpt2": GPTConfig.preset("gpt2"), "llama": GPTConfig.preset("llama-tiny")}),
        "training": viz.training_curves(records),
        "rlhf": viz.rlhf_curves(records),
        "metrics": viz.metric_curves(records),
    }
    for name, fig in figures.items():
        _not_blank(_pixels(fig), min_colours=8)
    assert viz.metric_names(records) == ["reward", "kl", "kl_coef", "entropy"]
    with pytest.raises(ValueError, match="not a PPO run"):
        viz.rlhf_curves([{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match="no loss"):
        viz.training_curves([{"step": 1, "lr": 0.1}])


def test_sampling_bars_hide_what_top_p_cuts():
    """At top-p 0.5 with probabilities 0.6 / 0.3 / 0.1 only the first bar is left standing."""
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    fig = viz.sampling_distributions(logits, temperatures=(1.0,), top_ps=(0.5,))
    heights = [round(p.get_height(), 3) for p in fig.axes[0].patches]
    assert heights == [1.0, 0.0, 0.0]
