"""One process of tests/test_state_distributed.py (run as a script: jax.distributed must start before
JAX does):

    python tests/_state_check.py ADDR N I FOLDER OUT.json

Every process builds the same FSDP-placed trainable tree and Adam state on a one-axis mesh over the
devices of all processes, saves it with StateStore (each process writing the shards its devices
hold), then opens the folder again and restores into zero-filled targets at the same shardings,
and at whole copies on every device. It reports, per leaf, whether its own shards came back
equal, where they live, and whether the whole copies equal the gathered originals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv):
    addr, n, i, folder, out = argv[0], int(argv[1]), int(argv[2]), Path(argv[3]), Path(argv[4])
    from jaxcls.train import distributed as dist

    dist.initialize(addr, n, i, timeout_s=60)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxcls.train import state as trainstate

    mesh = dist.data_mesh()
    host = {"wte": np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7, "bias": np.linspace(-1, 1, 8, dtype=np.float32)}
    trainable = dist.place(host, dist.shardings(host, mesh, fsdp=True, min_size=64))
    tx = optax.adam(1e-2)
    opt = dist.init_opt_state(tx, trainable, mesh, fsdp=True, min_size=64)
    grads = jax.tree.map(jnp.ones_like, trainable)
    _, opt = jax.jit(tx.update)(grads, opt, trainable)  # moments that are not zero
    store = trainstate.StateStore(folder)
    store.save(3, {"trainable": trainable, "opt_state": opt}, {"step": 3, "process": i})
    store.close()

    store = trainstate.StateStore(folder)
    zeros = jax.tree.map(lambda x: jax.jit(jnp.zeros_like, out_shardings=x.sharding)(x), (trainable, opt))
    got = store.load(store.latest(), {"trainable": zeros[0], "opt_state": zeros[1]})
    meta = store.meta(3)
    # a resumed run may arrange its devices otherwise (--fsdp is not a resumable setting): whole copies
    whole = jax.tree.map(lambda x: jax.jit(jnp.zeros_like, out_shardings=dist.replicated(mesh))(x), (trainable, opt))
    moved = store.load(3, {"trainable": whole[0], "opt_state": whole[1]})
    store.close()

    def same(a, b):
        return a.sharding == b.sharding and all(
            np.array_equal(np.asarray(x.data), np.asarray(y.data)) and x.index == y.index
            for x, y in zip(a.addressable_shards, b.addressable_shards))

    leaves = zip(jax.tree.leaves((trainable, opt)), jax.tree.leaves((got["trainable"], got["opt_state"])))
    from jax.experimental import multihost_utils

    gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves((trainable, opt))]
    replicated = [x.is_fully_replicated and np.array_equal(np.asarray(x.addressable_data(0)), g)
                  for x, g in zip(jax.tree.leaves((moved["trainable"], moved["opt_state"])), gathered)]
    report = {"process_count": jax.process_count(), "replicated": replicated, "meta": meta, "same": [same(a, b) for a, b in leaves],
              "wte_spec": [str(a) for a in got["trainable"]["wte"].sharding.spec],
              "wte_local_rows": [s.data.shape[0] for s in got["trainable"]["wte"].addressable_shards],
              "fully_addressable": got["trainable"]["wte"].is_fully_addressable}
    out.write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
