"""walt: do video diffusion models learn better representations than image diffusion models?

Importing walt loads the compiled ops (torch.ops.walt.*) and their Python registrations.
"""
import torch  # noqa: F401  (torch must be loaded before the extension's symbols resolve)

try:
    from walt import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "walt's compiled extension walt._C could not be loaded "
        f"({e}); build it with `pip install --no-build-isolation -e .` against the installed torch."
    ) from e

from walt import ops  # noqa: E402,F401

__version__ = "0.1.0"
