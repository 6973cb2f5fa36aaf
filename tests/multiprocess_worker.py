"""One process of the multi-process synchronized batch-norm test (tests/test_multiprocess.py).

The launcher (``examples/_multiprocess.py``) starts this script once per
process, each with its own host CPU devices, and the coordinator's address in
the environment. Every process builds the same global problem
(:func:`problem`), keeps its own slice of the batch, and runs every case on the
global mesh of all processes' devices:

- ``shard_map`` / ``shard_map_masked``: ``jaxnorm.batch_norm`` with
  ``axis_name`` under ``jax.shard_map``, unmasked and with a mask that leaves
  15 valid rows on process 0 and 3 on process 1 (padded rows hold NaN);
- ``sharded_jit`` / ``sharded_jit_masked``: the same under plain ``jax.jit`` on
  globally sharded arrays, without ``axis_name``;
- ``linen`` / ``nnx``: a Dense (Linear) layer and ``jaxnorm.linen.BatchNorm`` /
  ``jaxnorm.nnx.BatchNorm`` with ``axis_name``, one SGD step under
  ``shard_map``, masked;
- ``nan_*``: a second step of the functional, linen and NNX steps in which
  only process 1's batch holds a NaN; every process must keep the first
  step's statistics;
- ``checkpoint``: process 0 saves the linen model's statistics, every process
  restores them.

Each process writes ``<out>/process_<i>.npz``: every case's outputs gathered to
global NumPy arrays, and, for every replicated output, the copy held by each
of the process's devices (``<name>@replicas``). The test compares them with a
float64 NumPy reference of the whole global batch.

The blocks between ``# [guide]`` and ``# [/guide]`` are quoted verbatim by
docs/guides/multi_process.md; the test checks that the guide's code is this code.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import flax.linen as nn  # noqa: E402
import flax.serialization  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402
import jaxnorm.linen as jnl  # noqa: E402
import jaxnorm.nnx as jnx  # noqa: E402

AXIS = "batch"
N, C, F = 32, 3, 4  # global batch, input features, features of the normalized layer
MOMENTUM, LR = 0.9, 0.1
# valid rows of each of the 8 devices' 4 rows: 15 on the first 4 devices, 3 on the last 4
VALID_PER_DEVICE = (4, 4, 3, 4, 1, 0, 2, 0)
NAN_PROCESS = 1


def problem(seed: int = 0) -> dict[str, np.ndarray]:
    """The global problem, the same in every process and in the test: float32 data, bool mask."""
    rng = np.random.default_rng(seed)
    per = N // len(VALID_PER_DEVICE)
    valid = np.zeros((N, 1), bool)
    for d, c in enumerate(VALID_PER_DEVICE):
        valid[d * per: d * per + c] = True
    x = (1.5 + 3.0 * rng.standard_normal((N, C))).astype(np.float32)
    x[4 * per] = 40.0 + np.arange(C)  # the last devices' few valid rows include an outlier
    return dict(
        x=x,
        w=rng.standard_normal((N, C)).astype(np.float32),
        w_model=rng.standard_normal((N, F)).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, C).astype(np.float32),
        bias=rng.standard_normal(C).astype(np.float32),
        kernel=(rng.standard_normal((C, F)) / np.sqrt(C)).astype(np.float32),
        model_scale=rng.uniform(0.5, 2.0, F).astype(np.float32),
        model_bias=rng.standard_normal(F).astype(np.float32),
        valid=valid,
        x_nan_padded=np.where(valid, x, np.nan).astype(np.float32),  # padding must reach nothing
        x_big_padded=np.where(valid, x, 1e3).astype(np.float32),  # finite padding for the models' Dense
    )


# ---------------------------------------------------------------- the functional steps


def bn_step(x, w, scale, bias, stats, mask, *, axis_name):
    """y, new statistics and the gradient of sum(y * w) (valid rows) w.r.t. x, scale and bias."""

    def loss(x, scale, bias):
        y, new = jn.batch_norm(x, stats, scale, bias, training=True, momentum=MOMENTUM, unbiased=True,
                               mask=mask, axis_name=axis_name)
        return jnp.sum(jnp.where(mask, y * w, 0.0)), (y, new)

    (dx, dscale, dbias), (y, new) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, new, dx, dscale, dbias


def functional_steps(mesh):
    """{'shard_map': f, 'sharded_jit': f}: both take global arrays (x, w, scale, bias, stats, mask)."""
    spec = (P(AXIS), P(AXIS), P(), P(), P(), P(AXIS))
    synced = jax.jit(jax.shard_map(lambda *a: bn_step(*a, axis_name=AXIS), mesh=mesh, in_specs=spec,
                                   out_specs=(P(AXIS), P(), P(AXIS), P(), P())))
    partitioned = jax.jit(lambda *a: bn_step(*a, axis_name=None))
    return {"shard_map": synced, "sharded_jit": partitioned}


# ---------------------------------------------------------------- the models


# [guide]
class Net(nn.Module):
    """Dense without bias, then synchronized batch norm: the conv-BN pattern of a data-parallel net."""

    @nn.compact
    def __call__(self, x, mask):
        h = nn.Dense(F, use_bias=False, name="dense")(x)
        return jnl.BatchNorm(use_running_average=False, momentum=MOMENTUM, unbiased=True,
                             axis_name=AXIS, name="bn")(h, mask=mask)
# [/guide]


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(C, F, use_bias=False, rngs=rngs)
        self.bn = jnx.BatchNorm(F, momentum=MOMENTUM, unbiased=True, axis_name=AXIS, rngs=rngs)

    def __call__(self, x, mask):
        return self.bn(self.dense(x), mask=mask)


def linen_variables(d):
    """The linen model's variables with the problem's kernel, scale and bias (fresh statistics)."""
    # Net().init would need the named axis bound; the structure is flax's: params/{dense,bn}, batch_stats/bn.
    stats = jn.init_batch_stats(F)
    return {"params": {"dense": {"kernel": d["kernel"]}, "bn": {"scale": d["model_scale"], "bias": d["model_bias"]}},
            "batch_stats": {"bn": {"mean": stats.mean, "var": stats.var, "count": stats.count}}}


# [guide]
def make_train_step(model, optimizer, mesh):
    """One data-parallel step: every device runs the model on its rows; BatchNorm syncs over AXIS."""

    def step(params, batch_stats, opt_state, x, w, mask):
        def loss_fn(params):
            y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, mask,
                                     mutable=["batch_stats"])
            return jnp.sum(jnp.where(mask, y * w, 0.0)), updates["batch_stats"]

        # The parameters are replicated (P()), so shard_map sums their gradient over the devices.
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, grads

    return jax.jit(jax.shard_map(
        step, mesh=mesh,
        in_specs=(P(), P(), P(), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=(P(), P(), P(), P()),  # parameters, statistics and gradients: replicated
    ))
# [/guide]


def nnx_train_step(graphdef, mesh):
    """The NNX twin of make_train_step (plain SGD): (params, stats, x, w, mask) -> (params, stats, grads)."""

    def step(params, stats, x, w, mask):
        model = nnx.merge(graphdef, params, stats)

        def loss_fn(model):
            return jnp.sum(jnp.where(mask, model(x, mask) * w, 0.0))

        grads = nnx.grad(loss_fn)(model)  # w.r.t. the nnx.Param variables; the statistics update in place
        params = jax.tree.map(lambda p, g: p - LR * g, nnx.state(model, nnx.Param), grads)
        return params, nnx.state(model, nnx.BatchStat), grads

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                                 out_specs=(P(), P(), P())))


# ---------------------------------------------------------------- recording


def flat(tree, prefix):
    """{'<prefix>/<path>': leaf} for every leaf of a pytree (dicts, NamedTuples, nnx.State)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


def record(results, prefix, tree, *, replicated):
    """Gathers every leaf to a global NumPy array; for replicated ones also each local device's copy.

    ``replicated=True`` asserts that every leaf is replicated (``shard_map``'s ``P()`` outputs).
    """
    for name, leaf in flat(tree, prefix).items():
        results[name] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        assert leaf.sharding.is_fully_replicated or not replicated, name
        if leaf.sharding.is_fully_replicated:  # sharded jit's statistics too, where XLA replicates them
            results[name + "@replicas"] = np.stack([np.asarray(s.data) for s in leaf.addressable_shards])


def main(out: Path) -> None:
    from _multiprocess import initialize

    start = time.perf_counter()
    process_id, num_processes = initialize()
    # [guide]
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))  # every process's devices, process 0's first
    rows = NamedSharding(mesh, P(AXIS))  # the batch axis split over all devices
    replicated = NamedSharding(mesh, P())  # parameters and statistics: a full copy on every device

    def global_batch(local_rows):
        """This process's rows (its slice of the global batch) -> one global array."""
        return jax.make_array_from_process_local_data(rows, local_rows)
    # [/guide]

    # [guide]
    d = problem()  # the same global problem in every process (a real job reads its own shard of the data)
    per_process = N // num_processes
    mine = slice(process_id * per_process, (process_id + 1) * per_process)  # rows of this process's devices
    local = {k: v[mine] for k, v in d.items() if len(v) == N}
    g = {k: global_batch(v) for k, v in local.items()}
    # [/guide]
    put = lambda tree: jax.device_put(tree, replicated)  # noqa: E731  (same value on every process)
    scale, bias, fresh = put((d["scale"], d["bias"], jn.init_batch_stats(C)))
    ones = global_batch(np.ones((per_process, 1), bool))
    results = {}
    timings = {"initialize": time.perf_counter() - start}

    # functional: shard_map with axis_name and sharded jit without, unmasked and masked
    steps = functional_steps(mesh)
    first = {}
    for name, f in steps.items():
        for suffix, x, mask in (("", g["x"], ones), ("_masked", g["x_nan_padded"], g["valid"])):
            y, new, dx, dscale, dbias = f(x, g["w"], scale, bias, fresh, mask)
            record(results, f"{name}{suffix}/", {"y": y, "dx": dx}, replicated=False)
            record(results, f"{name}{suffix}/", {"stats": new, "dscale": dscale, "dbias": dbias},
                   replicated=name == "shard_map")
            if not suffix:
                first[name] = new
    timings["functional"] = time.perf_counter() - start

    # linen: one SGD step (the guide's train step), masked
    # [guide]
    optimizer = optax.sgd(LR)
    variables = jax.device_put(linen_variables(d), replicated)  # the same values on every process
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = jax.device_put(optimizer.init(params), replicated)
    train_step = make_train_step(Net(), optimizer, mesh)
    new_params, new_stats, _, grads = train_step(
        params, batch_stats, opt_state, g["x_big_padded"], g["w_model"], g["valid"])
    # [/guide]
    record(results, "linen/", {"params": new_params, "batch_stats": new_stats, "grads": grads}, replicated=True)
    timings["linen"] = time.perf_counter() - start

    # nnx: the same model and step
    model = NnxNet(nnx.Rngs(0))
    model.dense.kernel[...] = d["kernel"]
    model.bn.scale[...], model.bn.bias[...] = d["model_scale"], d["model_bias"]
    graphdef, nparams, nstats = nnx.split(model, nnx.Param, nnx.BatchStat)
    nparams, nstats = put((nparams, nstats))
    nnx_step = nnx_train_step(graphdef, mesh)
    nnx_params, nnx_stats, nnx_grads = nnx_step(nparams, nstats, g["x_big_padded"], g["w_model"], g["valid"])
    record(results, "nnx/", {"params": nnx_params, "stats": nnx_stats, "grads": nnx_grads}, replicated=True)
    timings["nnx"] = time.perf_counter() - start

    # a NaN in one process's batch: a second step from the first step's statistics changes nothing
    poisoned = {k: v.copy() for k, v in local.items()}
    if process_id == NAN_PROCESS:
        for k in ("x", "x_big_padded"):
            poisoned[k][0, 1] = np.nan
    gp = {k: global_batch(v) for k, v in poisoned.items()}
    for name, f in steps.items():
        new = f(gp["x"], g["w"], scale, bias, first[name], ones)[1]
        record(results, f"nan_{name}/", {"before": first[name], "after": new}, replicated=name == "shard_map")
    after = train_step(new_params, new_stats, opt_state, gp["x_big_padded"], g["w_model"], ones)[1]
    record(results, "nan_linen/", {"before": new_stats, "after": after}, replicated=True)
    after = nnx_step(nnx_params, nnx_stats, gp["x_big_padded"], g["w_model"], ones)[1]
    record(results, "nan_nnx/", {"before": nnx_stats, "after": after}, replicated=True)
    timings["nan"] = time.perf_counter() - start

    # checkpoint from process 0, restore on every process
    path = out / "batch_stats.msgpack"
    batch_stats = new_stats
    # [guide]
    if jax.process_index() == 0:  # replicated: process 0's first local copy is the whole value
        host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), batch_stats)
        path.write_bytes(flax.serialization.msgpack_serialize(host))
    multihost_utils.sync_global_devices("statistics saved")  # no process reads before process 0 wrote

    restored = jax.device_put(flax.serialization.msgpack_restore(path.read_bytes()), replicated)
    # [/guide]
    record(results, "checkpoint/", restored, replicated=True)
    timings["checkpoint"] = time.perf_counter() - start

    results.update({f"timing/{k}": np.float64(v) for k, v in timings.items()})
    results["process_count"] = np.int64(jax.process_count())
    results["device_count"] = np.int64(jax.device_count())
    results["local_device_count"] = np.int64(jax.local_device_count())
    np.savez(out / f"process_{process_id}.npz", **results)


if __name__ == "__main__":
    from _multiprocess import run_worker

    run_worker(lambda: main(Path(sys.argv[1])))
