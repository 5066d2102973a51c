"""The paper's figures: which runs each one uses, its table and its plot.

Curves keep the paper's encoding (gradient update dashed with squares in #118AB2,
the construction solid with circles in #DD3497) and add a vertical line at the rank
threshold and, for linear models, the closed-form optimum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .aggregate import best_of_sweep, closed_form_loss, diverged_mask, summarise

BLUE, PINK, GREY = "#118AB2", "#DD3497", "#555555"
DASHED = {"color": BLUE, "linestyle": "--", "marker": "s"}
SOLID = {"color": PINK, "linestyle": "-", "marker": "o"}


@dataclass(frozen=True)
class Curve:
    label: str
    filters: dict
    style: dict


@dataclass(frozen=True)
class Figure:
    name: str
    filters: dict
    panel: str
    panels: tuple
    curves: tuple
    x: str = "rank"
    log_y: bool = False
    closed_form: bool = False
    caption: str = ""
    extra_filters: dict = field(default_factory=dict)


RANDOM_PRETRAINED = (("pretrained", 0, "Random"), ("pretrained", 1, "Pretrained"))
FNN_DEPTHS = (("depths", "1,2", r"$\bar{L}=1,\ L=2$"), ("depths", "2,4", r"$\bar{L}=2,\ L=4$"))
TFN_DEPTHS = (("target_depth", 1, r"$L=1$"), ("target_depth", 2, r"$L=2$"))
PLAIN = {"rank_step": 0, "init_mode": "default", "ranks": None}
LORA_VS_OURS = (
    Curve("Gradient Update", {"method": "sgd", "tune_bias": 1}, DASHED),
    Curve("Our Construction", {"method": "ours"}, SOLID),
)

FIGURES = {
    "figure1": Figure(
        "figure1", {"exp": "fnn", "activation": "linear", "use_bias": 0, "target_depth": 1, "frozen_depth": 2,
                    **PLAIN},
        "pretrained", RANDOM_PRETRAINED,
        (Curve("Gradient Update", {"method": "sgd"}, DASHED), Curve("Our Construction", {"method": "ours"}, SOLID)),
        closed_form=True,
        caption="Linear FNNs without biases, target depth 1 on frozen depth 2. The paper's claim: the construction "
                "reaches zero error at rank >= width * target_depth / frozen_depth (the vertical line) and matches "
                "the closed-form optimum (dotted) below it, while the gradient update's error stays at or above "
                "the construction's and plateaus above the threshold.",
    ),
    "figure2": Figure(
        "figure2", {"exp": "fnn", "activation": "relu", "use_bias": 1, "target_depth": 2, "frozen_depth": 4, **PLAIN},
        "pretrained", RANDOM_PRETRAINED, LORA_VS_OURS,
        caption="ReLU FNNs with biases, target depth 2 on frozen depth 4. The paper's claim: the construction is "
                "exact from rank width * target_depth / frozen_depth = width / 2 on (the vertical line; 8 at width "
                "16), and the gradient update plateaus above that rank.",
    ),
    "fnn_approx": Figure(
        "fnn_approx", {"exp": "fnn", "activation": "relu", "use_bias": 1, "pretrained": 0, **PLAIN},
        "depths", FNN_DEPTHS, LORA_VS_OURS,
        caption="ReLU FNNs with biases and random frozen models, target depth 1 on frozen depth 2 and 2 on 4. "
                "The paper's claim: the construction is exact from rank width * target_depth / frozen_depth on "
                "(the vertical line), and the gradient update plateaus above it.",
    ),
    "fnn_approx_pretrained": Figure(
        "fnn_approx_pretrained", {"exp": "fnn", "activation": "relu", "use_bias": 1, "pretrained": 1, **PLAIN},
        "depths", FNN_DEPTHS, LORA_VS_OURS,
        caption="ReLU FNNs with biases and pretrained frozen models, target depth 1 on frozen depth 2 and 2 on 4. "
                "The paper's claim: the construction is exact from rank width * target_depth / frozen_depth on "
                "(the vertical line), and the gradient update plateaus above it.",
    ),
    "tfn_approx": Figure(
        "tfn_approx", {"exp": "tfn", "pretrained": 0}, "target_depth", TFN_DEPTHS,
        (Curve("Gradient Update", {"method": "sgd"}, DASHED), Curve("Our Construction", {"method": "ours"}, SOLID)),
        log_y=True,
        caption="Transformers with random frozen models of the target's depth (1 or 2), log scale. The paper's "
                "claim: the construction is exact from rank width / 2 on (the vertical line), and the gradient "
                "update plateaus above it.",
    ),
    "tfn_approx_pretrained": Figure(
        "tfn_approx_pretrained", {"exp": "tfn", "pretrained": 1}, "target_depth", TFN_DEPTHS,
        (Curve("Gradient Update", {"method": "sgd"}, DASHED), Curve("Our Construction", {"method": "ours"}, SOLID)),
        log_y=True,
        caption="Transformers with pretrained frozen models of the target's depth (1 or 2), log scale. The "
                "paper's claim: the construction is exact from rank width / 2 on (the vertical line), and the "
                "gradient update plateaus above it.",
    ),
    "flt_approx": Figure(
        "flt_approx", {"exp": "fnn", "activation": "relu", "use_bias": 1, "target_depth": 1, "frozen_depth": 8,
                       "init_mode": "default"},
        "pretrained", RANDOM_PRETRAINED,
        (Curve("LoRA", {"method": "sgd", "tune_bias": 1, "rank_step": 0, "ranks": None}, DASHED),
         Curve("Tuning Final Layers", {"method": "flt"}, SOLID)),
        x="parameters",
        caption="ReLU FNNs, target depth 1 on frozen depth 8: LoRA by gradient update against tuning the final "
                "layers, at equal numbers of tunable parameters (LoRA 2 * rank * width * frozen_depth, final "
                "layers last_layers * width^2).",
    ),
    "lora_bitfit_approx": Figure(
        "lora_bitfit_approx", {"exp": "fnn", "activation": "relu", "use_bias": 1, "target_depth": 1,
                               "frozen_depth": 2, "method": "sgd", **PLAIN},
        "pretrained", RANDOM_PRETRAINED,
        (Curve("Fixed Biases", {"tune_bias": 0}, DASHED), Curve("Updatable Biases", {"tune_bias": 1}, SOLID)),
        x="parameters_with_biases",
        caption="ReLU FNNs, target depth 1 on frozen depth 2: LoRA by gradient update with fixed against "
                "updatable biases, at equal numbers of tunable parameters (tuned biases add width * frozen_depth).",
    ),
}

RANK_STEP_FILTERS = {"exp": "fnn", "activation": "relu", "use_bias": 1, "target_depth": 2, "frozen_depth": 4,
                     "method": "sgd", "tune_bias": 1, "init_mode": "default"}


def select(table: pd.DataFrame, filters: dict) -> pd.DataFrame:
    mask = pd.Series(True, index=table.index)
    for key, value in filters.items():
        if key not in table:
            return table.iloc[0:0]
        mask &= table[key].isna() if value is None else table[key] == value
    return table[mask]


def matches(config: dict, figure: Figure) -> bool:
    """Return whether a run feeds the figure, so that each figure rule gets only its own runs."""
    values = dict(config)
    values["depths"] = f"{values['target_depth']},{values['frozen_depth']}"
    if any(values.get(key) != value for key, value in figure.filters.items()):
        return False
    if not any(values.get(key) == value for key, value, _ in figure.panels):
        return False
    return any(all(values.get(key) == value for key, value in curve.filters.items()) for curve in figure.curves)


def feeds(name: str, config: dict) -> bool:
    """Return whether a run's configuration is an input of the named figure.

    The name "rank_steps" stands for the rank-step table.
    """
    if name == "rank_steps":
        return config.get("ranks") is None and all(config.get(key) == value for key, value in RANK_STEP_FILTERS.items())
    return matches(config, FIGURES[name])


def tunable_parameters(row, count_biases: bool = False) -> int:
    """Tunable parameters: LoRA 2*R*D*L (+ D*L tuned biases if counted); final layers last_layers*D^2."""
    width, depth = row["width"], row["frozen_depth"]
    if row["method"] == "flt":
        return int(row["last_layers"] * width * width)
    parameters = 2 * row["rank"] * width * depth
    if count_biases and row["use_bias"] and row["tune_bias"]:
        parameters += width * depth
    return int(parameters)


def figure_runs(records: pd.DataFrame, figure: Figure) -> pd.DataFrame:
    """Return the per-seed runs of the figure, with panel, curve, x and the test loss.

    Each cell keeps the best run of its sweep (aggregate.best_of_sweep). Runs that
    diverged stay in the table as extra rows with diverged=True, so that the
    summary can count them. No curve uses them.
    """
    if records.empty:
        return pd.DataFrame()
    table = records.copy()
    table["depths"] = table["target_depth"].astype(str) + "," + table["frozen_depth"].astype(str)
    table = select(table, figure.filters)
    parts = []
    for key, value, panel_title in figure.panels:
        for curve in figure.curves:
            part = select(select(table, {key: value}), curve.filters).drop(columns=["depths"])
            for rows in (best_of_sweep(part), part[diverged_mask(part)]):
                if not rows.empty:
                    parts.append(rows.assign(panel=panel_title, curve=curve.label))
    if not parts:
        return pd.DataFrame()
    selected = pd.concat(parts, ignore_index=True)
    if figure.x == "rank":
        selected["x"] = selected["rank"]
    else:
        count_biases = figure.x == "parameters_with_biases"
        selected["x"] = selected.apply(tunable_parameters, axis=1, count_biases=count_biases)
    if figure.closed_form:
        ours = selected[(selected["method"] == "ours") & ~diverged_mask(selected)]
        optimum = ours.assign(
            curve="Closed-form optimum",
            test_loss=[closed_form_loss(row.singular_values, row.rank, row.frozen_depth, row.target_depth, row.width)
                       for row in ours.itertuples()],
        )
        selected = pd.concat([selected, optimum], ignore_index=True)
    return selected


SUMMARY_COLUMNS = ["panel", "curve", "x", "median", "q25", "q75", "min", "max", "n_seeds", "n_diverged"]


def figure_summary(selected: pd.DataFrame) -> pd.DataFrame:
    """Median and spread of the test loss over seeds per curve point, with the number of diverged runs.

    A point whose runs all diverged keeps a row with n_seeds 0 and empty statistics.
    """
    if selected.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return _with_diverged_counts(selected, ["panel", "curve", "x"])[SUMMARY_COLUMNS]


def _with_diverged_counts(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Summarise the finite runs of rows by the given keys and add n_diverged per group."""
    diverged = diverged_mask(rows)
    finite = rows[~diverged]
    if finite.empty:
        summary = pd.DataFrame(columns=[*by, "median", "q25", "q75", "min", "max", "n_seeds"])
    else:
        summary = summarise(finite, by)
    counts = rows[diverged].groupby(by, dropna=False).size().rename("n_diverged").reset_index()
    merged = summary.merge(counts, on=by, how="outer") if not counts.empty else summary.assign(n_diverged=0)
    merged["n_seeds"] = merged["n_seeds"].fillna(0).astype(int)
    merged["n_diverged"] = merged["n_diverged"].fillna(0).astype(int)
    return merged.sort_values(by).reset_index(drop=True)


def rank_threshold(figure: Figure, panel_rows: pd.DataFrame) -> float | None:
    """Rank from which the construction is exact: width*target_depth/frozen_depth (FNN), width/2 (TFN)."""
    if figure.x != "rank" or panel_rows.empty:
        return None
    row = panel_rows.iloc[0]
    if row["exp"] == "tfn":
        return row["width"] / 2
    return row["width"] * row["target_depth"] / row["frozen_depth"]


def plot_figure(selected: pd.DataFrame, figure: Figure, pdf_path: str, png_path: str, metadata: dict):
    """Render the figure's panels side by side to a PDF and a PNG with the same content."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not selected.empty:
        selected = selected[~diverged_mask(selected)]
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.2)
    titles = [title for *_, title in figure.panels]
    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles), 3.4), squeeze=False, sharey=False)
    styles = {curve.label: curve.style for curve in figure.curves}
    styles["Closed-form optimum"] = {"color": GREY, "linestyle": ":", "marker": "^"}
    for ax, title in zip(axes[0], titles):
        rows = selected[selected["panel"] == title] if not selected.empty else selected
        for label, style in styles.items():
            curve = rows[rows["curve"] == label] if not rows.empty else rows
            if curve.empty:
                continue
            sns.lineplot(data=curve, x="x", y="test_loss", estimator="median", errorbar=("pi", 50), ax=ax,
                         label=label, color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                         markersize=6, linewidth=1.8, markeredgecolor=style["color"])
        threshold = rank_threshold(figure, rows)
        if threshold is not None:
            ax.axvline(threshold, color=GREY, linewidth=1, linestyle="-.", label="Rank threshold")
        if rows.empty:
            ax.text(0.5, 0.5, "no runs in the grid", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(r"LoRA-rank $R$" if figure.x == "rank" else "Number of tunable parameters")
        ax.set_ylabel("MSE")
        if figure.log_y:
            ax.set_yscale("log")
        if figure.x == "rank" and not rows.empty:
            width = int(rows["width"].iloc[0])
            ax.set_xticks([tick for tick in range(width // 4, width + 1, max(width // 4, 1))])
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(pdf_path, metadata={"Title": figure.name, **{k: v for k, v in metadata.items()
                                                               if k in ("Subject", "Keywords", "Creator")}})
    fig.savefig(png_path, dpi=150, metadata={"Title": figure.name, **{k: v for k, v in metadata.items()
                                                                        if k in ("Description", "Software")}})
    plt.close(fig)


def rank_step_table(records: pd.DataFrame) -> pd.DataFrame:
    """MSE and parameter count per rank_step for target depth 2 on frozen depth 4 (the paper's table).

    The statistics leave out the runs that diverged, and n_diverged counts them.
    """
    columns = ["pretrained", "rank", "rank_step", "layer_ranks", "parameters", "median", "q25", "q75", "min",
               "max", "n_seeds", "n_diverged"]
    if records.empty:
        return pd.DataFrame(columns=columns)
    table = select(records, RANK_STEP_FILTERS)
    table = table[table["ranks"].isna()] if "ranks" in table else table
    rows = pd.concat([best_of_sweep(table), table[diverged_mask(table)]])
    if rows.empty:
        return pd.DataFrame(columns=columns)
    from .config import RunConfig

    def layer_ranks(row):
        config = RunConfig(width=int(row["width"]), frozen_depth=int(row["frozen_depth"]), rank=int(row["rank"]),
                           rank_step=int(row["rank_step"]))
        return config.layer_ranks()

    rows = rows.assign(
        layer_ranks=[str(layer_ranks(row)) for _, row in rows.iterrows()],
        parameters=[2 * int(row["width"]) * sum(layer_ranks(row)) for _, row in rows.iterrows()],
    )
    summary = _with_diverged_counts(rows, ["pretrained", "rank", "rank_step", "layer_ranks", "parameters"])
    return summary[columns].sort_values(["pretrained", "rank", "rank_step"]).reset_index(drop=True)


def markdown_table(table: pd.DataFrame) -> str:
    """Format a GitHub-flavoured Markdown table, floats with 4 significant digits."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
