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
from optax_mg.flatness import HessianTraceEstimate
from optax_mg.flatness import SharpnessEstimate
from optax_mg.flatness import TopHessianEigenvalue
from optax_mg.flatness import flatness_report
from optax_mg.flatness import hessian_trace
from optax_mg.flatness import sharpness
from optax_mg.flatness import top_hessian_eigenvalue

__version__ = "0.1.0"

__all__ = (
    "HessianTraceEstimate",
    "MirrorAlignment",
    "MirrorGradientState",
    "PLACEMENTS",
    "SharpnessEstimate",
    "TopHessianEigenvalue",
    "WithMirrorGradientState",
    "flatness_report",
    "hessian_trace",
    "is_mirror_step",
    "mirror_alignment",
    "mirror_gradient",
    "mirror_train_step",
    "restart_cycle",
    "sharpness",
    "top_hessian_eigenvalue",
    "with_mirror_gradient",
)
