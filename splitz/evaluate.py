"""Certified accuracy on a fixed test subset: a TSV per image, a summary table, and plots."""

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .checkpoint import LoadedModel
from .errors import InputError
from .smoothing import Smooth
from .stats import text_down, text_up

COLUMNS = ["idx", "label", "predict", "radius", "correct", "time", "L", "pA_lower"]
RADII = tuple(round(0.25 * i, 2) for i in range(11))  # 0, 0.25, ..., 2.5
ORDERS = ("index", "spread")


@dataclass(frozen=True)
class Summary:
    images: int
    certified_accuracy: dict[float, float]  # radius -> share correct with R >= radius
    average_certified_radius: float  # mean of R over correct images (0 when wrong or abstain)


def evaluate(loaded: LoadedModel, out: Path, every: int, limit: int | None = None,
             n0: int = 100, n: int = 100_000, alpha: float = 0.001, batch_size: int | None = None,
             seed: int = 0, data_root: Path | None = None, device: str = "cpu",
             dataset: str | None = None, precision: str | None = None,
             order: str = "index", on_row: Callable[[Summary], None] | None = None) -> Summary:
    """Certify test images 0, every, 2*every, ... of `dataset` (default: the card's), the first
    `limit` of them in `order` (see `subset`); resumes an interrupted TSV where it stopped.
    on_row gets the summary of the TSV after each row written."""
    dataset = dataset or loaded.card.dataset
    if dataset not in data.SPECS.keys() | data.VARIANTS.keys():
        raise InputError(f"no test set for data set {dataset!r}: evaluate knows "
                         f"{', '.join(sorted(data.SPECS.keys() | data.VARIANTS.keys()))}")
    if data.VARIANTS.get(dataset, dataset) != loaded.card.dataset:
        raise InputError(f"model {loaded.card.id} is for {loaded.card.dataset}, not {dataset}")
    test = data.load(dataset, train=False, root=data_root)
    planned = subset(len(test), every, order)
    rows = read_tsv(out) if out.exists() else []
    done = {int(r["idx"]) for r in rows}
    if done != set(planned[:len(done)]):
        raise InputError(f"{out} holds other images than the first {len(done)} of every "
                         f"{every}th in {order} order: resume it with the options that wrote it")
    indices = planned[:limit]
    smooth = Smooth.from_checkpoint(loaded, batch_size, device, precision)
    new = not out.exists() or out.stat().st_size == 0  # killed before its header: rewrite
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        if new:
            writer.writerow(COLUMNS)
        for idx in tqdm([i for i in indices if i not in done], desc="evaluate", unit="image"):
            x, label = test[idx]
            c = smooth.certify(x, n0=n0, n=n, alpha=alpha, seed=seed + idx)[0]
            pred = -1 if c.abstained else c.prediction
            row = [idx, int(label), pred, text_down(c.radius, 6), int(pred == int(label)),
                   f"{c.time_s:.3f}", text_up(c.lipschitz, 6), text_down(c.p_a_lower, 6)]
            writer.writerow(row)
            f.flush()
            rows.append(dict(zip(COLUMNS, map(str, row), strict=True)))
            if on_row is not None:
                on_row(summarize(rows))
    return summarize(rows)


def subset(size: int, every: int, order: str = "index") -> list[int]:
    """Test images 0, every, 2*every, ... < size in evaluation order: by index, or spread (one
    fixed shuffle, the same everywhere), so that the first k of them are a uniform sample of the
    subset and a partial run estimates the whole one (the first MNIST images are harder)."""
    if order not in ORDERS:
        raise InputError(f"unknown order {order!r}; known: {', '.join(ORDERS)}")
    indices = list(range(0, size, every))
    if order == "spread":
        random.Random(0).shuffle(indices)
    return indices


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def summarize(rows: list[dict[str, str]], radii: tuple[float, ...] = RADII) -> Summary:
    correct = torch.tensor([int(r["correct"]) for r in rows], dtype=torch.bool)
    radius = torch.tensor([float(r["radius"]) for r in rows], dtype=torch.float64)
    acc = {r: float((correct & (radius >= r)).double().mean()) for r in radii}
    acr = float((radius * correct).mean())
    return Summary(len(rows), acc, acr)


def markdown_table(summaries: dict[str, Summary]) -> str:
    """One row per run: certified accuracy (%) at each radius, then the ACR."""
    radii = tuple(next(iter(summaries.values())).certified_accuracy)
    return "\n".join([*markdown_head(radii), *(markdown_row(n, s) for n, s in summaries.items())])


def markdown_head(radii: tuple[float, ...]) -> list[str]:
    return ["| run | images | " + " | ".join(f"ε={r:g}" for r in radii) + " | ACR |",
            "|" + "---|" * (len(radii) + 3)]


def markdown_row(name: str, s: Summary) -> str:
    cells = " | ".join(f"{100 * a:.1f}" for a in s.certified_accuracy.values())
    return f"| {name} | {s.images} | {cells} | {s.average_certified_radius:.3f} |"


def plot(runs: dict[str, list[dict[str, str]]], out: Path, max_radius: float = 3.0) -> None:
    """Certified accuracy against radius for several runs (name -> TSV rows) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tuple(max_radius * i / 300 for i in range(301))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        acc = summarize(rows, grid).certified_accuracy
        ax.plot(list(acc), [100 * a for a in acc.values()], label=name)
    ax.set(xlabel="l2 radius", ylabel="certified accuracy (%)", ylim=(0, 100), xlim=(0, max_radius))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
