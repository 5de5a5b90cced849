"""Domain difficulty: seed-model perplexity on each domain's validation split -> a ranking ->
easy / moderate / difficult.

`classify` is pure (tested on its own); `measure_difficulty` runs the seed models and writes
`RUN/difficulty/difficulty.json` with the numbers behind the classes, plus a plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hdee.atomic import atomic_path
from hdee.config import DIFFICULTY_CLASSES, DifficultyConfig, ExperimentConfig
from hdee.layout import RunLayout
from hdee.records import DifficultyRecord

HELD_OUT = "held-out"


def tercile_groups(ranked: list[str], classes: tuple[str, ...] = DIFFICULTY_CLASSES) -> dict:
    """Split domains ranked from easiest to hardest into len(classes) near-equal groups (the
    middle classes take the remainder first, as numpy.array_split does from the front)."""
    groups = np.array_split(np.array(ranked, dtype=object), len(classes))
    return {
        str(domain): cls for cls, group in zip(classes, groups, strict=True) for domain in group
    }


def classify(
    perplexity: dict[str, float],
    config: DifficultyConfig,
    trainable: list[str],
) -> tuple[dict[str, str], list[float]]:
    """Classes of the trainable domains and the perplexity cut points between classes.

    Terciles are taken over the trainable domains only: held-out domains must not move the
    boundaries of what gets trained. Cut points are the geometric means of the neighbours
    across each boundary (for the report and to place held-out domains).
    """
    missing = [d for d in trainable if d not in perplexity]
    if missing:
        raise ValueError(f"no seed perplexity for domain(s) {missing}")
    ranked = sorted(trainable, key=lambda d: (perplexity[d], d))
    if config.method == "fixed":
        assert config.fixed is not None
        unclassified = [d for d in trainable if d not in config.fixed]
        if unclassified:
            raise ValueError(
                f"difficulty.fixed gives no class for trained domain(s) {unclassified}"
            )
        classes = {d: config.fixed[d] for d in trainable}
        cuts = _cut_points_from_classes(ranked, classes, perplexity)
    elif config.method == "thresholds":
        assert config.thresholds is not None
        low, high = config.thresholds
        classes = {
            d: "easy"
            if perplexity[d] < low
            else "moderate"
            if perplexity[d] < high
            else "difficult"
            for d in trainable
        }
        cuts = [low, high]
    else:
        if len(ranked) < len(DIFFICULTY_CLASSES):
            raise ValueError(
                f"tercile classification needs at least {len(DIFFICULTY_CLASSES)} trainable "
                f"domains, got {len(ranked)}"
            )
        classes = tercile_groups(ranked)
        cuts = _cut_points_from_classes(ranked, classes, perplexity)
    return classes, cuts


def _cut_points_from_classes(
    ranked: list[str], classes: dict[str, str], perplexity: dict[str, float]
) -> list[float]:
    cuts = []
    for left, right in zip(DIFFICULTY_CLASSES, DIFFICULTY_CLASSES[1:], strict=False):
        below = [perplexity[d] for d in ranked if classes[d] == left]
        above = [perplexity[d] for d in ranked if classes[d] == right]
        if below and above:
            cuts.append(math.sqrt(max(below) * min(above)))
        else:
            cuts.append(float("nan"))
    return cuts


def class_by_cut_points(value: float, cuts: list[float]) -> str:
    for cls, cut in zip(DIFFICULTY_CLASSES, cuts, strict=False):
        if not math.isnan(cut) and value < cut:
            return cls
    return DIFFICULTY_CLASSES[-1]


def combine_seed_perplexities(per_seed: dict[str, dict[str, float]]) -> dict[str, float]:
    """Several seeds rank together by the geometric mean of their perplexities (a mean of
    losses), so no single size dominates the ranking."""
    if len(per_seed) == 1:
        return dict(next(iter(per_seed.values())))
    domains = next(iter(per_seed.values())).keys()
    return {
        d: math.exp(sum(math.log(p[d]) for p in per_seed.values()) / len(per_seed)) for d in domains
    }


def difficulty_record(
    per_seed: dict[str, dict[str, float]],
    config: DifficultyConfig,
    trainable: list[str],
    held_out: list[str],
) -> DifficultyRecord:
    """Everything behind the classes, as written to difficulty.json."""
    used = {config.seed_size: per_seed[config.seed_size]} if config.seed_size else per_seed
    perplexity = combine_seed_perplexities(used)
    classes, cuts = classify(perplexity, config, trainable)
    return DifficultyRecord(
        method=config.method,
        seed_sizes=sorted(used),
        perplexity=perplexity,
        seed_perplexity=per_seed,
        ranking=sorted(perplexity, key=lambda d: (perplexity[d], d)),
        classes=classes,
        cut_points=cuts,
        held_out_classes={d: class_by_cut_points(perplexity[d], cuts) for d in held_out},
    )


def record_conflict(
    record: DifficultyRecord, config: ExperimentConfig, seed_sizes: list[str]
) -> str | None:
    """Why an earlier difficulty.json no longer fits `config` (None when it does): the
    classes the config's settings give the perplexities it holds must be its own classes.
    `seed_sizes`: the seeds the config trains (the ones the difficulty stage measures)."""
    domains = config.data.domain_names
    wanted = sorted([config.difficulty.seed_size] if config.difficulty.seed_size else seed_sizes)
    if wanted != sorted(record.seed_perplexity):
        return (
            f"it ranks the domains with seed(s) {sorted(record.seed_perplexity)}, the config "
            f"now with {wanted}"
        )
    missing = [d for d in domains if any(d not in p for p in record.seed_perplexity.values())]
    if missing:
        return f"it has no seed perplexity for domain(s) {missing} (added to data.domains since)"
    per_seed = {size: {d: p[d] for d in domains} for size, p in record.seed_perplexity.items()}
    trainable = config.trainable_domains
    held_out = [d for d in domains if d not in trainable]
    try:
        expected = difficulty_record(per_seed, config.difficulty, trainable, held_out)
    except ValueError as error:
        return f"the config's difficulty settings cannot classify its perplexities ({error})"

    def placed(r: DifficultyRecord) -> dict[str, str]:
        return {**r.classes, **{d: f"{HELD_OUT} ({c})" for d, c in r.held_out_classes.items()}}

    before, now = placed(record), placed(expected)
    changed = sorted(d for d in set(before) | set(now) if before.get(d) != now.get(d))
    if changed:
        shown = ", ".join(f"{d}: {before.get(d, '-')} -> {now.get(d, '-')}" for d in changed)
        return (
            "its classes were made with other settings (data.domains, plan.held_out or "
            f"difficulty.* changed since): {shown}"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Measuring (runs models)


def measure_difficulty(
    config: ExperimentConfig, layout: RunLayout, seed_dirs: dict[str, Path]
) -> DifficultyRecord:
    """Seed perplexity of every domain's validation split (`difficulty.eval_batches` batches
    of `evaluation.batch_size` windows); writes difficulty.json and its plot."""
    from hdee.data.tokens import load_tokens
    from hdee.ensemble import perplexity
    from hdee.scoring import load_expert, resolve_device, window_log_probs

    device = resolve_device(config.seeds.training.device)
    batch_size = config.evaluation.batch_size
    max_windows = config.difficulty.eval_batches * batch_size
    per_seed: dict[str, dict[str, float]] = {}
    for size, seed_dir in sorted(seed_dirs.items()):
        if config.difficulty.seed_size and size != config.difficulty.seed_size:
            continue
        model = load_expert(seed_dir, device)
        per_seed[size] = {
            domain: perplexity(
                window_log_probs(
                    model,
                    load_tokens(layout.tokens(domain, "validation")),
                    config.data.seq_len,
                    batch_size,
                    max_windows,
                )
            )
            for domain in sorted(config.data.domain_names)
        }
        del model
    trainable = config.trainable_domains
    held_out = [d for d in config.data.domain_names if d not in trainable]
    record = difficulty_record(per_seed, config.difficulty, trainable, held_out)
    record.write(layout.difficulty_record)
    plot_difficulty(record, layout.difficulty_plot)
    return record


def plot_difficulty(record: DifficultyRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"easy": "#4c9f70", "moderate": "#e0a030", "difficult": "#c0504d", HELD_OUT: "#888"}
    ranking = record.ranking
    values = [record.perplexity[d] for d in ranking]
    labels = [record.classes.get(d, HELD_OUT) for d in ranking]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(ranking) + 1.2))
    ax.barh(ranking, values, color=[colours[c] for c in labels])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("seed validation perplexity (log scale)")
    for cut in record.cut_points:
        if not math.isnan(cut):
            ax.axvline(cut, color="black", linestyle=":", linewidth=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in colours]
    ax.legend(handles, list(colours), loc="lower right", fontsize=8)
    ax.set_title("Domain difficulty")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
