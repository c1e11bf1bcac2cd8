"""Write docs/published/*.tsv: the published models' per-image certify logs on the standard MNIST
subset, so docs/make_results.py can compare a run here with them on exactly its images.

    python docs/published/extract.py PATH/TO/smoothing-consistency/.git

Source: github.com/jh-jeong/smoothing-consistency (MIT License, (c) 2020 Jongheon Jeong),
data/certify/mnist: Cohen et al.'s certify (n0 = 100, n = 100,000, alpha = 0.001) on all 10,000
MNIST test images, for LeNets the authors trained with the Gaussian recipe and with consistency
regularization (m = 2, the lambda of their EXPERIMENTS.MD), several training runs each. Kept here:
every 10th test image (the standard subset) and the columns the summaries read.
"""

import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
EVERY = 10
LOGS = "data/certify/mnist"
# our file stem -> the authors' log folder and its runs (one training run each)
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
}


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True,
                          text=True).stdout


def main(repo: str) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    for stem, (folder, logs) in SOURCES.items():
        lines = [f"# github.com/jh-jeong/smoothing-consistency@{commit} {LOGS}/{folder}/ "
                 "(MIT License, (c) 2020 Jongheon Jeong); every 10th MNIST test image; "
                 "run = the log's name ends _<run>; written by docs/published/extract.py",
                 "run\tidx\tlabel\tpredict\tradius\tcorrect"]
        for log in logs:
            rows = git(repo, "show", f"HEAD:{LOGS}/{folder}/{log}").splitlines()[1:]
            for row in rows:
                idx, label, predict, radius, correct, _ = row.split("\t")
                if int(idx) % EVERY == 0:
                    run = log.rsplit("_", 1)[1]
                    lines.append("\t".join([run, idx, label, predict, radius, correct]))
        (OUT / f"{stem}.tsv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
