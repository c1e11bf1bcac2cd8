"""Certified accuracy on a fixed test subset: a TSV per image, a summary table, and plots."""

import csv
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .checkpoint import LoadedModel
from .errors import InputError, first_line
from .smoothing import Smooth, check_sampling, default_precision
from .stats import text_down, text_up

COLUMNS = ["idx", "label", "predict", "radius", "correct", "time", "L", "pA_lower"]
SUMMED = ("idx", "radius", "correct")  # what resuming and summarizing an evaluation read
RADII = tuple(round(0.25 * i, 2) for i in range(11))  # 0, 0.25, ..., 2.5
ORDERS = ("index", "spread")
STANDARD_EVERY = {"cifar10": 20, "mnist": 10}  # the standard subsets (CIFAR-10: 500 images)


@dataclass(frozen=True)
class Summary:
    images: int
    certified_accuracy: dict[float, float]  # radius -> share correct with R >= radius
    average_certified_radius: float  # mean of R over correct images (0 when wrong or abstain)


@dataclass(frozen=True)
class Protocol:
    """What fixes an evaluation's rows, with the weights: the test subset, the sampling and the
    draws (seed and batch). A TSV resumes only under the protocol that wrote it (`claim`); it is
    written beside the TSV (`<stem>.protocol.json`) and into the card's record of the run."""
    data: str
    every: int
    order: str
    n0: int
    n: int
    alpha: float
    seed: int
    precision: str
    batch: int

    def __post_init__(self) -> None:  # before claim writes a run's files under it
        check_sampling(self.n, self.alpha, self.n0)
        if self.data not in data.SPECS.keys() | data.VARIANTS.keys():
            raise InputError(f"no test set for data set {self.data!r}: evaluate knows "
                             f"{', '.join(sorted(data.SPECS.keys() | data.VARIANTS.keys()))}")

    @classmethod
    def of(cls, loaded: LoadedModel, data_set: str | None = None, every: int | None = None,
           order: str = "index", n0: int = 100, n: int = 100_000, alpha: float = 0.001,
           seed: int = 0, precision: str | None = None, batch: int | None = None,
           device: str = "cpu") -> "Protocol":
        """The protocol with the defaults filled in: the card's data set, precision and batch,
        and the standard subset (every 10th MNIST, every 20th CIFAR-10 test image)."""
        data_set = data_set or loaded.card.dataset
        every = every or STANDARD_EVERY.get(data.VARIANTS.get(data_set, data_set), 1)
        protocol = cls(data_set, every, order, n0, n, alpha, seed,
                       precision or default_precision(loaded.card.precision, device),
                       batch or loaded.card.batch_size)
        protocol.check(loaded)
        return protocol

    def check(self, loaded: LoadedModel) -> None:
        """Refuse a test set of another data set than the model's."""
        if data.VARIANTS.get(self.data, self.data) != loaded.card.dataset:
            raise InputError(f"model {loaded.card.id} is for {loaded.card.dataset}, "
                             f"not {self.data}")


def claim(out: Path, protocol: dict, recorded: dict | None = None) -> None:
    """Write the protocol file of a new run's `out`, or refuse to resume `out` under another
    protocol than the one it was written with (`recorded`, the card's record of the run, else
    the protocol file; a file with neither, from before them, is not checked)."""
    sidecar = out.with_suffix(".protocol.json")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps(protocol, indent=2) + "\n")
        return
    if not isinstance(recorded, dict) or recorded.get("tsv") != out.name:
        try:
            recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        except (OSError, ValueError) as e:
            raise InputError(f"unreadable {sidecar} ({e}): write a new TSV") from None
    if not isinstance(recorded, dict):
        return
    differ = []
    for key, value in protocol.items():
        was = recorded.get(key, "index" if key == "order" else value)  # older: fewer keys
        if was != value:
            differ.append(f"{key} {was} (now {value})")
    if differ:
        raise InputError(f"{out} was written with {', '.join(differ)}: resume it with the "
                         "options that wrote it, or write a new file")


def evaluate(loaded: LoadedModel, out: Path, protocol: Protocol, limit: int | None = None,
             data_root: Path | None = None, device: str = "cpu",
             on_row: Callable[[Summary], None] | None = None) -> Summary:
    """Certify the first `limit` images of the protocol's subset (see `subset`) into the TSV
    `out`, resuming it where it stopped (under the same protocol only). on_row gets the
    summary of the TSV after each row written."""
    protocol.check(loaded)
    test = data.load(protocol.data, train=False, root=data_root)
    planned = subset(len(test), protocol.every, protocol.order)
    claim(out, asdict(protocol), loaded.card.metrics.get(out.stem))
    rows = read_tsv(out, SUMMED) if out.exists() else []
    done = {int(r["idx"]) for r in rows}
    if done != set(planned[:len(done)]):
        raise InputError(f"{out} holds other images than the first {len(done)} of every "
                         f"{protocol.every}th in {protocol.order} order: resume it with the "
                         "options that wrote it")
    indices = planned[:limit]
    smooth = Smooth.from_checkpoint(loaded, protocol.batch, device, protocol.precision)
    new = not out.exists() or out.stat().st_size == 0  # killed before its header: rewrite
    with open(out, "a", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        if new:
            writer.writerow(COLUMNS)
        for idx in tqdm([i for i in indices if i not in done], desc="evaluate", unit="image"):
            x, label = test[idx]
            c = smooth.certify(x, n0=protocol.n0, n=protocol.n, alpha=protocol.alpha,
                               seed=protocol.seed + idx)[0]
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


def read_tsv(path: Path, need: tuple[str, ...] = ("idx",)) -> list[dict[str, str]]:
    """The rows of a TSV with a header naming at least the columns `need` (an empty file,
    killed before its header, has no rows)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows, header = list(reader), reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable TSV ({first_line(e)})") from None
    if header is not None and (missing := [c for c in need if c not in header]):
        raise InputError(f"{path}: no column {', '.join(missing)} (an evaluation TSV has "
                         f"{', '.join(COLUMNS)})")
    return rows


def summarize(rows: list[dict[str, str]], radii: tuple[float, ...] = RADII) -> Summary:
    try:
        correct = torch.tensor([int(r["correct"]) for r in rows], dtype=torch.bool)
        radius = torch.tensor([float(r["radius"]) for r in rows], dtype=torch.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"an evaluation row without its correct and radius numbers "
                         f"({first_line(e)})") from None
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
