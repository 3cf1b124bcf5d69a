"""Data parallelism and FSDP over a one-axis device mesh, on one host or many.

Everything here only *places* pytrees: the jitted step in train.py runs unchanged on the placed
inputs (jit follows its inputs' shardings and XLA inserts the gradient all-reduce).
`make_sharded_train_step` re-jits the same step with pinned output shardings, so parameters and
optimizer state keep their placement (FSDP shards stay shards) and donation reuses the buffers.

Multi-process: every process runs the same program on the same global batch plan; each one puts
only its own rows of each batch on its devices (`process_slice`, `shard_batch`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcls.errors import ConfigError
from jaxcls.train.step import Batch, StepSpec, make_train_step

DATA = "data"  # the mesh axis: batch rows in data parallelism, parameter shards in FSDP
FSDP_MIN_SIZE = 2**18  # leaves with fewer elements (biases, LayerNorms, small heads) stay replicated


# --------------------------------------------------------------------------- processes

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout_s: int = 300) -> None:
    """Join the multi-process job: `jax.distributed.initialize`, before any other JAX call.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI,
    Kubernetes JobSets); on GPU clusters without such a launcher give all three. CPU collectives
    across processes use gloo. A second call, or one in an already joined process, does nothing.
    """
    if jax.distributed.is_initialized():
        return
    given = [coordinator is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ConfigError("distributed: give --coordinator, --num-processes and --process-id together "
                          "(or none of them, where JAX detects the cluster: TPU pods, SLURM, MPI)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"distributed: process id {process_id} is not in 0..{num_processes - 1}")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # Without this, CPU devices of other processes are visible but collectives over them fail.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "must be called before" in str(e):
            raise ConfigError("distributed: initialize() must run before anything touches a JAX "
                              f"device (load the model afterwards): {e}") from None
        raise
    except ValueError as e:  # nothing to auto-detect
        raise ConfigError(f"distributed: {e}; pass --coordinator HOST:PORT --num-processes N "
                          "--process-id I") from None


def is_main_process() -> bool:
    """True in exactly one process: the one that logs and writes files."""
    return jax.process_index() == 0


# --------------------------------------------------------------------------- meshes and shardings

def data_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "data" over `devices` (default: every device of every process, in
    process order, so each process's devices are one contiguous block of batch rows)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ConfigError("distributed: no devices for the mesh")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are (A, B, ...): the micro-batch axis A stays whole, B is split."""
    return NamedSharding(mesh, P(None, DATA))


def fsdp_spec(shape, n: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Split the largest axis divisible by `n` of a leaf with at least `min_size` elements;
    replicate anything smaller or with no such axis."""
    if n <= 1 or math.prod(shape) < min_size:
        return P()
    axes = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA
    return P(*spec)


def shardings(tree, mesh: Mesh, *, fsdp: bool = False, min_size: int = FSDP_MIN_SIZE):
    """A NamedSharding per leaf of `tree` (arrays or jax.ShapeDtypeStruct): replicated, or the
    FSDP rule by shape. The same rule serves parameters and optimizer state (Adam's moments have
    their parameter's shape, so they are split the same way; the step counter is replicated)."""
    n = mesh.shape[DATA]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_size) if fsdp else P()), tree)


def place(tree, sharding_tree):
    """Put each leaf at its sharding. Host values (numpy, or arrays on other devices) must be the
    same in every process; each process transfers only the pieces its own devices hold."""
    def put(x, s: NamedSharding):
        if s.is_fully_addressable or (isinstance(x, jax.Array) and x.sharding.device_set == s.device_set):
            return jax.device_put(x, s)  # all devices local, or on the mesh already: reshard there
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, sharding_tree)


def replicate(tree, mesh: Mesh):
    """Every leaf whole on every device of the mesh (NamedSharding(mesh, P()))."""
    return place(tree, shardings(tree, mesh))


def init_opt_state(tx, trainable, mesh: Mesh, *, fsdp: bool = False, min_size: int = FSDP_MIN_SIZE):
    """`tx.init(trainable)` created directly at its placement: no device ever holds the whole
    FSDP optimizer state."""
    out = shardings(jax.eval_shape(tx.init, trainable), mesh, fsdp=fsdp, min_size=min_size)
    return jax.jit(tx.init, out_shardings=out)(trainable)


# --------------------------------------------------------------------------- batches

def check_batch_rows(rows: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA]
    if rows % n:
        raise ConfigError(f"batch_size {rows} must be a multiple of the {n} devices that split it "
                          f"(data parallelism over {jax.process_count()} process(es))")


def process_slice(n_rows: int, mesh: Mesh | None = None) -> slice:
    """The rows of an (A, n_rows, ...) global batch that this process feeds: those held by its
    own devices, one contiguous block in `data_mesh`'s process order."""
    mesh = data_mesh() if mesh is None else mesh
    check_batch_rows(n_rows, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((1, n_rows))
    spans = sorted({(ix[1].start or 0, n_rows if ix[1].stop is None else ix[1].stop)
                    for ix in index_map.values()})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:
            raise ConfigError(f"distributed: this process's devices hold rows {spans}, not one block; "
                              "build the mesh with data_mesh()")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(batch: Batch, mesh: Mesh, *, is_global: bool = True) -> Batch:
    """Host arrays (A, B, ...) -> global arrays with B split over "data".

    `is_global`: `batch` is the whole step's batch (the same in every process) and each process
    takes its `process_slice`; otherwise it is already this process's rows only."""
    s = batch_sharding(mesh)
    rows = batch.labels.shape[1]
    if is_global:
        local = process_slice(rows, mesh)
        global_rows = rows
    else:
        local = slice(None)
        global_rows = rows * jax.process_count()
        check_batch_rows(global_rows, mesh)

    def put(x):
        x = np.asarray(x)
        r = x.shape[1] // rows  # token rows per example: 1, 2 for similarity, N for choice
        part = local if local.start is None else slice(local.start * r, local.stop * r)
        x = x[:, part]
        return jax.make_array_from_process_local_data(s, x, (x.shape[0], global_rows * r, *x.shape[2:]))

    return Batch(*(put(x) for x in batch))


# --------------------------------------------------------------------------- the step, results

def make_sharded_train_step(graphdef, tx, spec: StepSpec, mesh: Mesh, param_sharding,
                            opt_sharding):
    """The train step with its outputs pinned: parameters at `param_sharding`, optimizer state at
    `opt_sharding` (pytrees of NamedSharding, e.g. from `shardings(...)`), metrics replicated.
    Inputs are taken at whatever placement they carry."""
    return make_train_step(graphdef, tx, spec, out_shardings=(param_sharding, opt_sharding, replicated(mesh)))


def to_host(tree):
    """numpy copies of every leaf, whole, in every process (gathers shards other processes hold)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
