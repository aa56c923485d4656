"""ulma: align language models with demonstrations and point-wise human feedback.

``ulma.train(config, data=..., model=...)`` trains one run from Python (:mod:`ulma.api`);
``ulma.Config`` / ``ulma.load_config`` build the typed configuration it takes.
"""

__version__ = "0.1.0"

from ulma.api import train  # noqa: E402
from ulma.config import Config, load_config  # noqa: E402

__all__ = ["Config", "load_config", "train", "__version__"]
