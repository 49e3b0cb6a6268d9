"""Negative sampling and per-epoch batching of training rows, jittable on device.

For each training row (user, positive item) one negative item is drawn uniformly from the
item pool (the items that occur in the training split) minus the user's training items,
as MMRec does. MMRec draws by rejection, but ``NegativeSampler`` draws the same
distribution directly, without a loop. It picks a rank ``r`` uniformly in
``[0, pool_size - degree)`` and returns the ``r``-th pool item that the user has not
interacted with, found by a binary search over the user's sorted training items. The
cost per row is a fixed ``O(log max_degree)``. No key ``user * num_items + item`` is
formed, so large datasets cannot overflow int32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.data import Dataset, DatasetError


class Batch(NamedTuple):
    """Training rows of one batch; a leading [num_batches] axis for a whole epoch."""

    users: jax.Array  # shape=[B], dtype=int32
    pos_items: jax.Array  # shape=[B], dtype=int32
    neg_items: jax.Array  # shape=[B], dtype=int32
    mask: jax.Array  # shape=[B], dtype=bool; False on padding rows


@jax.tree_util.register_pytree_node_class
class NegativeSampler:
    """Uniform negative items from the training item pool, excluding each user's items.

    A pytree of device arrays, so it can be passed into jitted functions as an argument.

    Raises:
      DatasetError: at construction, when some user's training items cover the whole
        item pool, so that user has no negative item.
    """

    def __init__(self, dataset: Dataset):
        indptr = np.asarray(dataset.train_indptr, dtype=np.int64)
        indices = np.asarray(dataset.train_indices, dtype=np.int64)
        pool = np.asarray(dataset.item_pool, dtype=np.int64)
        num_train = indices.size
        if num_train >= np.iinfo(np.int32).max:
            raise DatasetError(
                f"dataset {dataset.name!r}: {num_train} training rows exceed the int32 index range"
            )

        degrees = np.diff(indptr)
        full_users = np.flatnonzero(degrees >= pool.size)
        if full_users.size:
            raise DatasetError(
                f"dataset {dataset.name!r}: user {full_users[0]} has training interactions "
                f"with all {pool.size} items of the item pool, so no negative item exists "
                f"({full_users.size} such user(s)); remove these users or widen the pool"
            )

        # For the j-th training item of a user (0-based) at pool position q_j, the number
        # of non-interacted pool items before it is q_j - j, non-decreasing in j.
        row_in_user = np.arange(num_train) - np.repeat(indptr[:-1], degrees)
        gaps_before = np.searchsorted(pool, indices) - row_in_user

        self.indptr = jnp.asarray(indptr, dtype=jnp.int32)
        self.gaps_before = jnp.asarray(gaps_before, dtype=jnp.int32)
        self.item_pool = jnp.asarray(pool, dtype=jnp.int32)
        # Each bisection step shrinks a search interval of length n to at most n // 2, so
        # bit_length(max_degree) steps settle every user's search.
        self.search_steps = max(int(degrees.max()), 1).bit_length()

    def tree_flatten(self):
        return (self.indptr, self.gaps_before, self.item_pool), self.search_steps

    @classmethod
    def tree_unflatten(cls, search_steps, children):
        sampler = object.__new__(cls)
        sampler.indptr, sampler.gaps_before, sampler.item_pool = children
        sampler.search_steps = search_steps
        return sampler

    def sample(self, key: jax.Array, users: jax.Array) -> jax.Array:
        """Draw one negative item per entry of ``users`` (any shape); jittable.

        Returns an int32 array shaped like ``users``. Equal keys give equal negatives.
        """
        users = jnp.asarray(users, dtype=jnp.int32)
        start = self.indptr[users]
        stop = self.indptr[users + 1]
        num_negatives = self.item_pool.shape[0] - (stop - start)
        rank = jax.random.randint(key, users.shape, 0, num_negatives, dtype=jnp.int32)

        # Count the user's training items with gaps_before <= rank: binary search for
        # the first position in [start, stop) whose gap count exceeds the rank.
        last_row = self.gaps_before.shape[0] - 1

        def halve(_, bounds):
            low, high = bounds
            middle = (low + high) // 2
            go_right = self.gaps_before[jnp.minimum(middle, last_row)] <= rank
            searching = low < high
            low = jnp.where(searching & go_right, middle + 1, low)
            high = jnp.where(searching & ~go_right, middle, high)
            return low, high

        low, _ = jax.lax.fori_loop(0, self.search_steps, halve, (start, stop))
        return self.item_pool[rank + (low - start)]


def num_batches(num_rows: int, batch_size: int) -> int:
    """Return the number of batches of ``batch_size`` rows that cover ``num_rows`` rows."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_rows <= 0:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    return -(-num_rows // batch_size)


def _sort_rounds(n: int) -> tuple[int, int] | None:
    """Return (index bits, rounds) of `permutation` for length ``n``, or None above 2**28."""
    index_bits = max(n - 1, 1).bit_length()
    random_bits = 32 - index_bits
    if random_bits < 4:
        return None
    return index_bits, max(1, math.ceil(3 * math.log2(max(n, 2)) / random_bits))


def permutation(key: jax.Array, n: int) -> jax.Array:
    """Return a random permutation of ``range(n)`` (int32), like `jax.random.permutation`.

    Both shuffle by stable sorts on random keys, repeated until ties are unlikely to
    leave a trace. `jax.random.permutation` sorts a key array and an index array together.
    Here every key carries its index in its low bits, so each round sorts one uint32
    array. XLA sorts that about 5x faster on CPU: 2 ms against 12 ms for 59,541 rows, in
    an ad-hoc probe on a 2-core x86 machine with JAX 0.10.2. With ``b`` index bits, a round
    has ``32 - b`` random bits, and rounds repeat until ``n**3 <= 2**(rounds * (32 - b))``,
    the criterion `jax.random.permutation` applies to its 32-bit keys. Sizes above 2**28,
    which would leave too few random bits, use `jax.random.permutation` itself.

    Args:
      key: PRNG key; equal keys give equal permutations.
      n: length of the permutation (static).
    """
    plan = _sort_rounds(n)
    if plan is None:
        return jax.random.permutation(key, n).astype(jnp.int32)
    index_bits, rounds = plan
    positions = jnp.arange(n, dtype=jnp.uint32)
    index_mask = jnp.uint32((1 << index_bits) - 1)
    order = jnp.arange(n, dtype=jnp.int32)
    for round_key in jax.random.split(key, rounds):
        random_high = jax.random.bits(round_key, (n,), jnp.uint32) & ~index_mask
        # Sorting (random key, current position) is a stable sort by the random key.
        order = order[jax.lax.sort(random_high | positions) & index_mask]
    return order


@functools.partial(jax.jit, static_argnames=("batch_size",))
def epoch_batches(
    key: jax.Array,
    train_users: jax.Array,
    train_items: jax.Array,
    sampler: NegativeSampler,
    batch_size: int,
) -> Batch:
    """Shuffle the training rows and cut them into batches with fresh negatives.

    Every training row appears exactly once. The last batch is padded to ``batch_size``
    with copies of valid rows whose ``mask`` is False, so gathers stay in range.

    Args:
      key: PRNG key of this epoch; equal keys give equal batches.
      train_users: int32 [num_rows] users of the training rows.
      train_items: int32 [num_rows] items of the training rows.
      sampler: the negative sampler of the same dataset.
      batch_size: rows per batch (static).

    Returns:
      A ``Batch`` of arrays shaped [num_batches(num_rows, batch_size), batch_size].
    """
    num_rows = train_users.shape[0]
    count = num_batches(num_rows, batch_size)
    padded_rows = count * batch_size
    order_key, negative_key = jax.random.split(key)

    order = permutation(order_key, num_rows)
    order = order[jnp.arange(padded_rows) % num_rows]
    mask = jnp.arange(padded_rows) < num_rows

    users = jnp.asarray(train_users, dtype=jnp.int32)[order]
    pos_items = jnp.asarray(train_items, dtype=jnp.int32)[order]
    neg_items = sampler.sample(negative_key, users)
    shape = (count, batch_size)
    return Batch(
        users=users.reshape(shape),
        pos_items=pos_items.reshape(shape),
        neg_items=neg_items.reshape(shape),
        mask=mask.reshape(shape),
    )
