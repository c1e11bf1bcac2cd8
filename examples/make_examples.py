"""Write the first ten MNIST test digits as examples/mnist-<label>-<index>.png.

    SPLITZ_DATA=../shared/data python examples/make_examples.py
"""

from pathlib import Path

from splitz import data
from splitz.images import save_image

if __name__ == "__main__":
    test = data.load("mnist", train=False)
    for i in range(10):
        x, y = test[i]
        save_image(x, Path(__file__).parent / f"mnist-{y}-{i:04d}.png")
