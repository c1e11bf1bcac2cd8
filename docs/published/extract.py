"""Write docs/published/*.tsv: the published models' per-image certify logs on the standard
subsets, so docs/make_results.py can compare a run here with them on exactly its images.

    python docs/published/extract.py PATH/TO/smoothing-consistency/.git

Source: github.com/jh-jeong/smoothing-consistency (MIT License, (c) 2020 Jongheon Jeong: its text
in LICENSE beside these files),
data/certify: Cohen et al.'s certify (n0 = 100, n = 100,000, alpha = 0.001) on all 10,000 test
images, for networks the authors trained with the Gaussian recipe and with consistency
regularization (m = 2, the lambda of their EXPERIMENTS.MD): MNIST LeNets, several training runs
each, and CIFAR-10 ResNet-20s (exact pixels), one run each. Kept here: the standard subset (every
10th MNIST, every 20th CIFAR-10 test image) and the columns the summaries read.
"""

import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
EVERY = {"mnist": 10, "cifar10": 20}  # the standard subsets
# our file stem (data set first) -> the authors' log folder under data/certify/<data set> and its
# runs (one training run each)
SOURCES = {
    "mnist-gaussian-s0.25": ("cohen", ["noise_0.25_3870", "noise_0.25_4067", "noise_0.25_6298",
                                       "noise_0.25_919", "noise_0.25_9555"]),
    "mnist-gaussian-s0.5": ("cohen", ["noise_0.50_1801", "noise_0.50_393", "noise_0.50_4490",
                                      "noise_0.50_4608", "noise_0.50_880"]),
    "mnist-gaussian-s1.0": ("cohen", ["noise_1.00_2110", "noise_1.00_5510", "noise_1.00_5991",
                                      "noise_1.00_8335", "noise_1.00_9609"]),
    "mnist-consistency-lambda10-s0.25": ("consistency/cohen/num_2/lbd_10.0/eta_0.5",
                                         [f"noise_0.25_{i}" for i in range(1, 6)]),
    "mnist-consistency-lambda5-s0.5": ("consistency/cohen/num_2/lbd_5.0/eta_0.5",
                                       [f"noise_0.50_{i}" for i in range(1, 6)]),
    "mnist-consistency-lambda5-s1.0": ("consistency/cohen/num_2/lbd_5.0/eta_0.5",
                                       [f"noise_1.00_{i}" for i in range(0, 6)]),
    "cifar10-gaussian-s0.5": ("cohen/cifar_resnet20", ["noise_0.50_7483"]),
    "cifar10-consistency-lambda10-s0.5": (
        "consistency/cohen/num_2/lbd_10.0/eta_0.5/cifar_resnet20", ["noise_0.50"]),
}


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True,
                          text=True).stdout


def main(repo: str) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    for stem, (folder, logs) in SOURCES.items():
        data = stem.split("-")[0]
        where = f"data/certify/{data}/{folder}"
        lines = [f"# github.com/jh-jeong/smoothing-consistency@{commit} {where}/ (MIT License, "
                 f"(c) 2020 Jongheon Jeong); every {EVERY[data]}th {data} test image; run = the "
                 "log's name ends _<run> (or is the name); written by docs/published/extract.py",
                 "run\tidx\tlabel\tpredict\tradius\tcorrect"]
        for log in logs:
            for row in git(repo, "show", f"HEAD:{where}/{log}").splitlines()[1:]:
                idx, label, predict, radius, correct, _ = row.split("\t")
                if int(idx) % EVERY[data] == 0:
                    run = log.rsplit("_", 1)[1] if log.count("_") > 1 else log
                    lines.append("\t".join([run, idx, label, predict, radius, correct]))
        (OUT / f"{stem}.tsv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
