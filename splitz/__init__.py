"""splitz: certified l2 robustness with SPLITZ (split Lipschitz randomized smoothing).

    model = splitz.load_model("models/mnist-input-consistency-s1.0")
    certs = splitz.Smooth.from_checkpoint(model).certify(images, n=100_000, alpha=0.001)
"""

import os

# Idle OpenMP threads spin for milliseconds after each parallel region by default, on the cores
# where the noise threads (noise.py) run next: a short spin halves the noise time on two
# threads and leaves f2's speed as it was. libgomp reads this when torch is first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .checkpoint import LoadedModel, ModelCard  # noqa: E402
from .checkpoint import load as load_model
from .errors import CheckpointError, InputError, SplitzError, UnknownModelError
from .lipschitz import F1Bound, input_radius
from .nets import SplitModel, create_model, list_architectures
from .smoothing import Certificate, Prediction, Smooth

__all__ = [
    "Certificate", "CheckpointError", "F1Bound", "InputError", "LoadedModel", "ModelCard",
    "Prediction", "Smooth", "SplitModel", "SplitzError", "UnknownModelError", "create_model",
    "input_radius", "list_architectures", "load_model",
]
