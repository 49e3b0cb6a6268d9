"""Mirror Gradient (MG) for optax.

MG takes, on every ``interval``-th batch, a descent step and then a small
ascent step on the same batch at the new parameters, which steers training
toward flat minima.
"""

from optax_mg._diagnostics import MirrorAlignment
from optax_mg._diagnostics import mirror_alignment
from optax_mg._mirror import MirrorGradientState
from optax_mg._mirror import PLACEMENTS
from optax_mg._mirror import WithMirrorGradientState
from optax_mg._mirror import is_mirror_step
from optax_mg._mirror import mirror_gradient
from optax_mg._mirror import mirror_train_step
from optax_mg._mirror import restart_cycle
from optax_mg._mirror import with_mirror_gradient

__version__ = "0.1.0"

__all__ = (
    "MirrorAlignment",
    "MirrorGradientState",
    "PLACEMENTS",
    "WithMirrorGradientState",
    "is_mirror_step",
    "mirror_alignment",
    "mirror_gradient",
    "mirror_train_step",
    "restart_cycle",
    "with_mirror_gradient",
)
