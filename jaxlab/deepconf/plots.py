"""The figures of the DeepConf experiments (experiments/deepconf.py, experiments/deepconf_seeds.py).
"""

from __future__ import annotations

import numpy as np

from jaxlab import results


def accuracy_vs_tokens(summary: dict, path, ylabel: str = "accuracy (%)") -> None:
    """Accuracy against mean tokens per problem: every offline method over the K values, each
    online rule as a star. A figure is a number, or a {"mean", "std"} spread over runs
    (experiments/deepconf_seeds.py), drawn with one std as error bars."""
    def mean_std(x):
        return (x["mean"], x["std"]) if isinstance(x, dict) else (x, 0.0)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    offline = list(summary["offline"].values())
    tokens = [mean_std(row["tokens"])[0] for row in offline]
    for name in (n for n in offline[0] if n != "tokens"):
        mean, std = zip(*(mean_std(row[name]) for row in offline), strict=True)
        ax.errorbar(tokens, 100 * np.asarray(mean), yerr=100 * np.asarray(std), fmt="o-",
                    capsize=3, label=name, alpha=0.8)
    for rule, row in summary["online"].items():
        (tokens_mean, tokens_std), (accuracy, accuracy_std) = map(
            mean_std, (row["tokens"], row["accuracy"]))
        ax.errorbar([tokens_mean], [100 * accuracy], xerr=[tokens_std],
                    yerr=[100 * accuracy_std], fmt="*", markersize=14, capsize=3,
                    label=f"online {rule}")
    ax.set_xscale("log")
    ax.set_xlabel("mean tokens per problem")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    results.save_figure(fig, path)
    plt.close(fig)

