"""Device meshes and shardings for data-parallel training with row-sharded embedding tables.

Training uses JAX's SPMD partitioning: a `jax.sharding.Mesh` names the devices, each
training batch is split along its rows over every device of the mesh, and parameters
and optimizer state are replicated, so XLA inserts the all-reduce of the gradients.
With ``shard_embeddings`` the mesh gets a second axis, ``"model"``. Every array whose
first axis has the length of the user or item count is then split along its rows over
that axis: the embedding tables, FREEDOM's feature tables and their optimizer moments.

Mesh layouts, for ``N`` devices in ``P`` processes (hosts):

* data parallelism only: one axis ``("data",)`` of size ``N``;
* with ``shard_embeddings``: axes ``("data", "model")`` of shape ``(P, N // P)``. Tables are
  split over the devices of one host, and batch rows over all ``N`` devices.

NOTE: graph propagation (`models.graph.propagate`) is a sparse-dense product that on CPU
lowers to the custom call ``cpu_csr_sparse_dense_ffi`` (JAX 0.10.2), which XLA cannot
partition. XLA therefore gathers sharded tables before it, and every device runs the whole
propagation. The per-row losses and, with sharded tables, the optimizer updates and the
evaluation scores are still split. Other backends were not checked.

Batch rows are padded to a multiple of ``N`` with rows whose mask is False. The models
give padded rows exactly zero loss and gradient and divide by the number of valid rows,
so ``N`` devices compute the same loss as one device, up to the order of float sums.

Multi-host runs start every process with the same command, which first calls
`maybe_initialize_distributed`. Every process loads the same dataset and builds the same
replicated arrays, and `jax.device_put` asserts that their values agree across processes
when it places them on the global mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Environment variables that describe a multi-process run when no cluster manager does.
# JAX itself reads only JAX_COORDINATOR_ADDRESS.
COORDINATOR_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

Tree = TypeVar("Tree")


def maybe_initialize_distributed(cluster_detection: bool = False) -> bool:
  """Call `jax.distributed.initialize` when the environment describes a multi-process run.

  It must run before any other JAX call. The run is multi-process when
  ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` are set, or when ``cluster_detection`` is True, in which case JAX
  detects them from the cluster manager (Slurm, Open MPI, Cloud TPU and others).

  NOTE: multi-process training was tried by hand only, as two processes with CPU devices
  on one machine (gloo collectives). No test covers it, and no run crossed hosts.

  Returns:
    Whether the distributed runtime was initialized by this call.

  Raises:
    ValueError: when only some of the variables are set, or a count is not an integer.
  """
  if jax.distributed.is_initialized():
    return False
  present = [name for name in COORDINATOR_VARIABLES if os.environ.get(name)]
  if cluster_detection:
    jax.distributed.initialize()
  elif len(present) == len(COORDINATOR_VARIABLES):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=_environment_int("JAX_NUM_PROCESSES"),
        process_id=_environment_int("JAX_PROCESS_ID"))
  elif present:
    missing = [name for name in COORDINATOR_VARIABLES if name not in present]
    raise ValueError(
        f"incomplete multi-process setup: {', '.join(present)} set but {', '.join(missing)}"
        " missing. Set all of them, or none for a single-process run.")
  else:
    return False
  logger.info("distributed runtime initialized: process %d of %d, %d local and %d global"
              " devices", jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  return True


def _environment_int(name: str) -> int:
  text = os.environ[name]
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"invalid environment variable {name}={text!r}; expected an integer")


def resolve_device_count(devices: int | None) -> int:
  """Return the number of devices to train on; None means all devices of all processes.

  Raises:
    ValueError: when ``devices`` exceeds `jax.device_count`, or a multi-process run
      requests fewer devices than all of them.
  """
  available = jax.device_count()
  if devices is None:
    return available
  if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise ValueError(f"invalid devices {devices!r}; expected an integer >= 1 or None")
  if devices > available:
    raise ValueError(
        f"invalid devices {devices}: more than the {available} available"
        f" (jax.device_count() = {available}). On CPU, start the process with"
        f" XLA_FLAGS=--xla_force_host_platform_device_count={devices} to get {devices}"
        " virtual devices.")
  if jax.process_count() > 1 and devices != available:
    raise ValueError(
        f"invalid devices {devices}: a run of {jax.process_count()} processes trains on all"
        f" {available} devices; leave devices unset")
  return devices


def make_mesh(num_devices: int | None = None, shard_embeddings: bool = False) -> Mesh:
  """Build the training mesh over the first ``num_devices`` devices (None: all).

  Args:
    num_devices: devices in the mesh, at most `jax.device_count`.
    shard_embeddings: add the ``"model"`` axis over which embedding tables are split;
      the mesh is then ``("data", "model")`` with one data row per process.

  Returns:
    A mesh whose axes have `AxisType.Auto`, so shardings are hints to XLA's partitioner
    and the training code stays unchanged.
  """
  num_devices = resolve_device_count(num_devices)
  devices = jax.devices()[:num_devices]
  if not shard_embeddings:
    return jax.make_mesh((num_devices,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)
  processes = jax.process_count()
  return jax.make_mesh((processes, num_devices // processes), (DATA_AXIS, MODEL_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def pad_rows(batch: Tree, multiple: int, *, axis: int = -1, mask_field: str = "mask") -> Tree:
  """Pad every array of ``batch`` along ``axis`` to a multiple of ``multiple`` rows.

  Padded rows copy the first row, so gathers with them stay in range, and their
  ``mask_field`` entries are False. ``batch`` is a NamedTuple such as
  `models.sampling.Batch`; it is returned unchanged when its rows already divide.
  """
  size = getattr(batch, mask_field).shape[axis]
  padding = -size % multiple
  if padding == 0:
    return batch

  def pad(name: str, values: jax.Array) -> jax.Array:
    axis_index = axis % values.ndim
    if name == mask_field:
      fill_shape = list(values.shape)
      fill_shape[axis_index] = padding
      return jnp.concatenate([values, jnp.zeros(fill_shape, values.dtype)], axis=axis_index)
    first = jax.lax.slice_in_dim(values, 0, 1, axis=axis_index)
    return jnp.concatenate([values, jnp.repeat(first, padding, axis=axis_index)],
                           axis=axis_index)

  return type(batch)(**{name: pad(name, values) for name, values in batch._asdict().items()})


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """Placement of the arrays of one training program on the mesh.

  Attributes:
    mesh: the training mesh from `make_mesh`.
    sharded_rows: first-axis lengths of the arrays split along their rows over the
      ``"model"`` axis; empty without embedding sharding.
  """

  mesh: Mesh
  sharded_rows: frozenset[int] = frozenset()

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def batch_spec(self) -> PartitionSpec:
    """Spec of one batch's rows: split over every mesh axis."""
    return PartitionSpec(self.mesh.axis_names)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def padded_batch_size(self, batch_size: int) -> int:
    """Return ``batch_size`` rounded up to a multiple of the device count."""
    return -(-batch_size // self.num_devices) * self.num_devices

  def pad_batches(self, batches: Tree) -> Tree:
    """Pad the rows of ``[num_batches, batch_size]`` batches to a multiple of the device count."""
    return pad_rows(batches, self.num_devices, axis=1)

  def constrain_batches(self, batches: Tree) -> Tree:
    """Split the rows of an epoch's ``[num_batches, rows]`` batches over the mesh."""
    sharding = NamedSharding(self.mesh, PartitionSpec(None, self.mesh.axis_names))
    return jax.lax.with_sharding_constraint(batches, sharding)

  def constrain_batch(self, batch: Tree) -> Tree:
    """Split the rows of one ``[rows]`` batch over the mesh."""
    return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, self.batch_spec))

  def array_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
    """Return the sharding of an array of ``shape``: rows over "model" for tables, else replicated."""
    if shape and shape[0] in self.sharded_rows:
      return NamedSharding(self.mesh, PartitionSpec(MODEL_AXIS))
    return self.replicated

  def shardings(self, tree: Any) -> Any:
    """Return the sharding of every leaf of ``tree``, chosen by the leaf's shape."""
    return jax.tree.map(lambda leaf: self.array_sharding(jnp.shape(leaf)), tree)

  def place(self, tree: Tree) -> Tree:
    """Copy ``tree`` onto the mesh (host-side; for inputs of the compiled functions)."""
    return jax.tree.map(lambda leaf: jax.device_put(leaf, self.array_sharding(jnp.shape(leaf))),
                        tree)

  def replicate(self, tree: Tree) -> Tree:
    """Copy ``tree`` onto every device of the mesh."""
    return jax.device_put(tree, self.replicated)

  def constrain(self, tree: Tree) -> Tree:
    """Ask XLA for the shape-chosen sharding of every leaf of ``tree`` (inside jit)."""
    return jax.tree.map(
        lambda leaf: jax.lax.with_sharding_constraint(leaf, self.array_sharding(leaf.shape)),
        tree)


def make_sharding_plan(mesh: Mesh, table_rows: Iterable[int],
                       shard_embeddings: bool) -> ShardingPlan:
  """Decide which table row counts are split over the mesh's ``"model"`` axis.

  A `jax.Array` can only be split into equal parts, so a table whose row count is not a
  multiple of the ``"model"`` axis size stays replicated, and a warning names it.

  Args:
    mesh: mesh from `make_mesh`.
    table_rows: row counts of the embedding tables (the user and item counts).
    shard_embeddings: whether to split tables at all.
  """
  if not shard_embeddings:
    return ShardingPlan(mesh)
  if MODEL_AXIS not in mesh.axis_names:
    raise ValueError(f"shard_embeddings needs a mesh with a {MODEL_AXIS!r} axis, got axes"
                     f" {mesh.axis_names}; build it with make_mesh(n, shard_embeddings=True)")
  parts = mesh.shape[MODEL_AXIS]
  sharded = set()
  for rows in table_rows:
    if rows % parts == 0:
      sharded.add(int(rows))
    else:
      logger.warning("tables with %d rows stay replicated: %d rows cannot be split into %d"
                     " equal parts; choose a device count that divides %d", rows, rows, parts,
                     rows)
  return ShardingPlan(mesh, frozenset(sharded))
