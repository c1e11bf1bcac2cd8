"""docs/make_results.py compares SPLITZ with the baseline only on shared protocols."""

import importlib.util
from pathlib import Path

import pytest

from splitz import evaluate

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "make_results.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("make_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(results, tmp_path: Path, name: str, radii: list[float], splitz: bool,
         every: int = 10, n: int = 100_000, recipe: str = "gaussian",
         indices: list[int] | None = None):
    """A run on test images `indices` (default: 0, every, 2 every, ...) with these radii."""
    tsv = tmp_path / f"{name}.tsv"
    indices = indices or [i * every for i in range(len(radii))]
    rows = ["idx\tlabel\tpredict\tradius\tcorrect\ttime\tL\tpA_lower"]
    rows += [f"{i}\t0\t0\t{r}\t{int(r > 0)}\t1.0\t1.0\t0.9"
             for i, r in zip(indices, radii, strict=True)]
    tsv.write_text("\n".join(rows) + "\n")
    meta = {"every": every, "images": len(radii), "n": n, "data": "mnist", "n0": 100,
            "alpha": 0.001, "command": "splitz evaluate"}
    return results.Run(name, meta, tsv, splitz, recipe, 1.0 if splitz else 0.5)


def test_difference_uses_the_best_run_of_each_side_per_protocol(results, tmp_path):
    group = [_run(results, tmp_path, "splitz-a", [2.0, 0.0], True),
             _run(results, tmp_path, "splitz-b", [0.3, 0.3], True),
             _run(results, tmp_path, "cohen", [1.0, 1.0], False),
             _run(results, tmp_path, "cohen-other", [3.0, 3.0], False, n=10_000)]
    summaries = {r.name: evaluate.summarize(evaluate.read_tsv(r.tsv)) for r in group}
    best = results.best_by_protocol(group, summaries)
    protocol = "mnist, 2 images (every 10), n = 100,000"
    assert sorted(best) == ["mnist, 2 images (every 10), n = 10,000", protocol]
    assert list(best["mnist, 2 images (every 10), n = 10,000"]) == ["baseline"]  # no SPLITZ run
    splitz, base = best[protocol]["SPLITZ"], best[protocol]["baseline"]
    assert splitz[0.25] == 1.0 and splitz[1.5] == 0.5  # splitz-b at 0.25, splitz-a at 1.5
    assert base[0.25] == 1.0 and base[1.5] == 0.0
    rows = results.versus(results.same_recipe(group, summaries))[4:-1]  # the shared protocol
    assert len(rows) == 1 and rows[0].startswith(f"| {protocol}, gaussian | +0.0 | +0.0 |")
    assert "| +50.0 |" in rows[0]


def test_published_rows_sit_beside_the_measured_ones(results, tmp_path):
    group = [_run(results, tmp_path, "splitz", [2.0, 0.0], True),
             _run(results, tmp_path, "cohen", [1.0, 1.0], False)]
    summaries = {r.name: evaluate.summarize(evaluate.read_tsv(r.tsv)) for r in group}
    lines = results.published({("mnist", 1.0): group}, summaries)
    table = "\n".join(lines)
    assert ("| SPLITZ paper (unsound: power-iteration L estimate) |  |  |  |  | 83.1 | 75.9 | "
            "66.2 | 54.3 | 40.5 |") in table
    assert "| consistency m=2 (Jeong & Shin 2020), LeNet |  |  |  |  | 78.0–79.5 |" in table
    assert ("| SPLITZ, here: mnist, 2 images (every 10), n = 100,000 | 50.0 | 50.0 | 50.0 | "
            "50.0 | 50.0 | 50.0 | 50.0 | 0.0 | 0.0 |") in table
    assert "| baseline, here: mnist, 2 images (every 10), n = 100,000 | 100.0 |" in table
    assert "cifar10" not in table.split("### cifar10")[1]  # no CIFAR-10 run: published rows only


def test_splitz_meets_only_the_baseline_trained_with_its_recipe(results, tmp_path):
    group = [_run(results, tmp_path, "splitz", [2.0, 0.0], True, recipe="consistency"),
             _run(results, tmp_path, "cohen-gauss", [3.0, 3.0], False),
             _run(results, tmp_path, "cohen-cons", [1.0, 0.0], False, recipe="consistency")]
    summaries = {r.name: evaluate.summarize(evaluate.read_tsv(r.tsv)) for r in group}
    pairs = results.same_recipe(group, summaries)
    label = "mnist, 2 images (every 10), n = 100,000, consistency"
    assert list(pairs) == [label]  # no gaussian SPLITZ run: the gaussian baseline meets nobody
    words = "\n".join(results.verdict(group, summaries))
    # both 50 % up to radius 1.0 (certified at ε <= radius), SPLITZ alone to 2.0, nobody beyond
    assert (f"- {label} (σ: SPLITZ 1; baseline 0.5): SPLITZ wins at ε = 1.25, 1.5, 1.75, 2; "
            "ties at ε = 0, 0.25, 0.5, 0.75, 1.") in words
    assert "loses" not in words


def _model(source: Path, folder: Path) -> None:
    """A copy of a model folder's card and TSVs (no weights) under folder/<id>."""
    (folder / source.name).mkdir(parents=True)
    for f in [source / "card.json", *source.glob("*.tsv")]:
        (folder / source.name / f.name).write_bytes(f.read_bytes())


def test_retired_models_keep_their_runs_marked_and_are_not_measured(results, tmp_path):
    shipped, retired = tmp_path / "models", tmp_path / "retired"
    _model(results.MODELS / "mnist-splitz-quick", shipped)  # the tests' model, shipped for good
    for name in ("mnist-cohen-s0.5", "mnist-splitz-s1.0-theta1-g1"):
        _model(results.RETIRED / name, retired)
    _model(results.RETIRED / "mnist-splitz-s1.0-theta1-g1", shipped)  # restored: counts once
    (retired / "README.md").write_text("not a model\n")
    groups = results.runs(shipped, retired)
    assert sorted(groups) == [("mnist", 0.5), ("mnist", 1.0)]
    assert [(r.name, r.retired, r.splitz) for r in groups[("mnist", 0.5)]] == [
        ("mnist-splitz-quick (eval-every100-n10000)", False, True),
        ("mnist-splitz-quick (eval-every100-n10000-bf16)", False, True),
        ("mnist-cohen-s0.5 (eval-every100-n10000, retired)", True, False)]
    s1 = groups[("mnist", 1.0)]
    assert [r.name for r in s1] == [
        "mnist-splitz-s1.0-theta1-g1 (eval-every100-n10000, retired)",
        "mnist-splitz-s1.0-theta1-g1 (eval-every10-first100-n100000, retired)"]
    assert all(r.tsv.parent == retired / "mnist-splitz-s1.0-theta1-g1" and r.tsv.is_file()
               for r in s1)
    # no retired weights anywhere: the locality table names the model instead of loading it
    text = "\n".join(results.locality({("mnist", 1.0): s1}, shipped))
    assert ("the retired mnist-splitz-s1.0-theta1-g1. Their last rows, measured with the "
            "weights, are in docs/retired/README.md") in text
    assert "\n| mnist-splitz" not in text  # no row measured


def test_baselines_meet_the_published_logs_on_their_own_images(results, tmp_path):
    logs = tmp_path / "published"
    logs.mkdir()
    # two published runs on images 0..3 (radius 0: abstained); our runs cover images 0 and 1
    (logs / "mnist-gaussian-s0.5.tsv").write_text(
        "# source\nrun\tidx\tlabel\tpredict\tradius\tcorrect\n"
        "a\t0\t1\t1\t1.0\t1\na\t1\t2\t2\t0.3\t1\na\t2\t3\t3\t2.0\t1\na\t3\t4\t4\t2.0\t1\n"
        "b\t0\t1\t1\t0.5\t1\nb\t1\t2\t0\t0.4\t0\nb\t2\t3\t3\t2.0\t1\nb\t3\t4\t4\t2.0\t1\n")
    ours = _run(results, tmp_path, "cohen", [1.0, 1.0], False, every=1)
    dev = _run(results, tmp_path, "cohen-dev", [1.0, 1.0], False, every=1, n=10_000)
    split = _run(results, tmp_path, "splitz", [1.0, 1.0], True, every=1)
    other = _run(results, tmp_path, "cohen-more", [1.0] * 5, False, every=1)  # image 4: no log
    group = {("mnist", 0.5): [ours, dev, split._replace(sigma=0.5), other]}
    summaries = {r.name: evaluate.summarize(evaluate.read_tsv(r.tsv))
                 for r in group[("mnist", 0.5)]}
    rows = [line for line in results.same_images(group, summaries, logs) if line.startswith("| ")]
    published = ["| published gaussian, σ = 0.5, same images (2 runs)",
                 "| published gaussian, σ = 0.5, whole subset (2 runs)"]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| cohen", *published, "| splitz", *published]  # n = 10,000 and image 4: no rows
    same, whole = rows[2].split(" | "), rows[3].split(" | ")
    # run a certifies images 0 and 1 up to 1.0 and 0.3; run b image 0 up to 0.5, image 1 wrong
    assert same[1:8] == ["2", "50.0–100.0", "50.0–100.0", "50.0", "0.0–50.0", "0.0–50.0", "0.0"]
    assert whole[1] == "4" and whole[-1] == "1.125–1.325 |"  # ACR (0.5+0+2+2)/4, (1+0.3+2+2)/4
    full = _run(results, tmp_path, "cohen-all", [1.0] * 4, False, every=1)  # all four images
    summaries = {full.name: evaluate.summarize(evaluate.read_tsv(full.tsv))}
    rows = [line.split(" | ")[0] for line in results.same_images(
        {("mnist", 0.5): [full]}, summaries, logs) if line.startswith("| ")]
    assert rows[1:] == ["| cohen-all", published[0]]  # the same images are the whole subset


def test_a_spread_order_run_is_another_protocol_until_it_has_the_same_images(results,
                                                                              tmp_path):
    index = _run(results, tmp_path, "cohen", [1.0, 1.0], False)
    spread = {}
    for name, indices in (("partial", [30, 10]), ("whole", [10, 0])):  # in spread order
        run = _run(results, tmp_path, name, [0.0, 2.0], False, indices=indices)
        spread[name] = run._replace(meta=run.meta | {"order": "spread"})
    runs = [index, *spread.values()]
    summaries = {r.name: evaluate.summarize(evaluate.read_tsv(r.tsv)) for r in runs}
    best = results.best_by_protocol(runs, summaries)
    # images 10 and 0 are the index-order run's two: the same protocol; 30 and 10 another
    assert sorted(best) == ["mnist, 2 images (every 10), n = 100,000",
                            "mnist, 2 images (every 10, spread order), n = 100,000"]
    assert best["mnist, 2 images (every 10), n = 100,000"]["baseline"][1.5] == 0.5  # "whole"


def test_a_run_on_a_data_set_variant_meets_the_logs_of_its_data_set(results, tmp_path):
    logs = tmp_path / "published"
    logs.mkdir()
    (logs / "cifar10-gaussian-s0.5.tsv").write_text(
        "run\tidx\tlabel\tpredict\tradius\tcorrect\nx\t0\t1\t1\t0.6\t1\nx\t1\t1\t1\t0.6\t1\n")
    run = _run(results, tmp_path, "cifar-exact", [0.3], False, every=1)
    run = run._replace(meta=run.meta | {"data": "cifar10-exact1000"})
    summaries = {run.name: evaluate.summarize(evaluate.read_tsv(run.tsv))}
    rows = results.same_images({("cifar10-exact1000", 0.5): [run]}, summaries, logs)
    assert "| published gaussian, σ = 0.5, same images (1 run) | 1 | 100.0 | 100.0 | 100.0 | 0.0" \
        in "\n".join(rows)


def test_rows_past_the_recorded_ones_are_left_out(results, tmp_path):
    """A run still going appends to a TSV its card recorded: the card's count is the run."""
    logs = tmp_path / "published"
    logs.mkdir()
    (logs / "mnist-gaussian-s0.5.tsv").write_text(
        "run\tidx\tlabel\tpredict\tradius\tcorrect\na\t0\t1\t1\t1.0\t1\na\t1\t1\t1\t1.0\t1\n")
    run = _run(results, tmp_path, "cohen", [2.0, 0.0], False, every=1)
    run = run._replace(meta=run.meta | {"images": 1})
    assert [row["idx"] for row in results.recorded(run)] == ["0"]
    summaries = {run.name: evaluate.summarize(results.recorded(run))}
    rows = "\n".join(results.same_images({("mnist", 0.5): [run]}, summaries, logs))
    assert "| cohen | 1 | 100.0 |" in rows and "same images (1 run) | 1 | 100.0 |" in rows
