"""
Figures of the routing analysis (matplotlib is optional: without it every number is still written, and
the caller prints FIGURES_SKIPPED).
"""
from pathlib import Path

import numpy as np

from evaluation.routing import curves, models_in

def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib (optional) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_routing(rows, out_dir, metric="js_norm", band=None):
    """routing_layers.png (per-layer curves per language, one panel per model, like the paper's Figure 5)
    and routing_heatmap.png (layer x language; with two models also b - a). -> list of paths, or None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    models = models_in(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = {"js": "JS (nats)", "js_norm": "JS / ln 2", "js_paired": "paired JS (nats)",
             "js_paired_norm": "paired JS / ln 2"}[metric]
    anchor = rows[0]["anchor"]
    # per-layer curves
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.3, 3.4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        layers, by_lang = curves(rows, model, metric)
        cmap = plt.get_cmap("tab10" if len(by_lang) <= 10 else "tab20")
        for k, (lang, vals) in enumerate(by_lang.items()):
            ax.plot(layers, vals, marker="o", ms=3, lw=1.2, color=cmap(k), label=lang)
        ax.plot(layers, np.mean(list(by_lang.values()), axis=0), color="black", lw=2.2, label="mean")
        if band:
            ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="grey", alpha=0.15, lw=0, label=f"band {band[0]}-{band[1]}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers if len(layers) <= 16 else layers[::max(1, len(layers) // 12)])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{label} to {anchor}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    paths = [out_dir / "routing_layers.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    # heatmaps
    panels = [(m, np.array(list(curves(rows, m, metric)[1].values()))) for m in models]
    if len(models) == 2:
        panels.append((f"{models[1]} - {models[0]}", panels[1][1] - panels[0][1]))
    layers, by_lang = curves(rows, models[0], metric)
    langs = list(by_lang)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.45 * len(layers) * len(panels) + 1.6 * len(panels) + 0.6,
                                                      0.32 * len(langs) + 1.4), squeeze=False)
    vmax = max(float(p.max()) for _, p in panels[:len(models)])
    for k, (ax, (title, grid)) in enumerate(zip(axes[0], panels)):
        diff = k == len(models)
        lim = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r" if diff else "viridis",
                       vmin=-lim if diff else 0.0, vmax=lim if diff else vmax)
        ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_yticks(range(len(langs)), langs, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
        if grid.size <= 200:
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if not diff and v < 0.6 * vmax else "black")
    fig.suptitle(f"{label} to {anchor}", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "routing_heatmap.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


FIGURES_SKIPPED = "figures skipped: matplotlib is not installed (pip install matplotlib); the numbers are in {}"
