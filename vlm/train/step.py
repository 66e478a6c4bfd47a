"""The pure training step and the helpers that create a sharded state and jit the step once.

``train_step(state, batch, rng) -> (state, metrics)`` is a pure function of arrays; the model,
optimizer, trainable mask and loss are bound with ``functools.partial`` before ``jax.jit``.
The step folds the state's step counter into ``rng``, so a resumed run draws exactly the dropout
masks and hard negatives that an uninterrupted run would.

Gradient accumulation (``microbatches > 1``): the global batch is split into ``microbatches`` equal
parts along each array's ``"batch"`` axis (row ``r`` goes to microbatch ``r % microbatches``, so
every device keeps its own rows), and ``jax.lax.scan`` runs forward and backward over them,
summing the gradients. If ``loss_fn`` reports ``metrics["loss_weight"]`` (e.g. the number of loss
tokens of its microbatch; its loss is then the mean over those), microbatch ``i``'s gradient is
weighted by ``w_i / sum_j w_j``, which is exactly the gradient of the token-weighted mean over the
whole batch; otherwise every microbatch weighs ``1 / microbatches``. Metrics are averaged with the
same weights (``loss_weight`` itself is summed). Microbatch ``i`` draws from
``fold_in(rng_of_step, i)``; with ``microbatches == 1`` the step is the plain one.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from vlm.parallel import mesh as mesh_lib
from vlm.train import optim
from vlm.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def _split_microbatches(batch, batch_dims, n: int, shardings=None):
  """Each array [.., B, ..] -> [n, .., B/n, ..] with row r in microbatch r % n."""
  def split(x, dim, sh):
    b = x.shape[dim]
    x = x.reshape(x.shape[:dim] + (b // n, n) + x.shape[dim + 1:])
    x = jnp.moveaxis(x, dim + 1, 0)
    if sh is not None:
      x = jax.lax.with_sharding_constraint(x, sh)
    return x

  if shardings is None:
    return jax.tree.map(lambda x, d: split(x, d, None), batch, batch_dims)
  return jax.tree.map(split, batch, batch_dims, shardings)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, mask: Mapping[tuple, bool],
               loss_fn: LossFn, loss_kwargs: Mapping[str, Any] | None = None,
               microbatches: int = 1, batch_dims: Any = None,
               microbatch_shardings: Any = None) -> tuple[TrainState, dict]:
  """One optimizer step on the trainable parameters.

  Args:
    state: current state.
    batch: global batch (dict of arrays, nested dicts allowed).
    rng: base PRNG key of the run (the step number is folded in here).
    model, tx, mask, loss_fn, loss_kwargs: bound statically. ``loss_fn(model, params, batch,
      rng, **loss_kwargs) -> (loss, metrics)``.
    microbatches: gradient accumulation over this many equal parts of ``batch`` (see the
      module docstring); 1 = one pass over the whole batch.
    batch_dims: like ``batch``, the index of each array's batch dimension (needed when
      ``microbatches > 1``; default 0 everywhere).
    microbatch_shardings: optional shardings of the split arrays ``[n, .., B/n, ..]``.
  Returns:
    (new state, metrics): the loss parts from ``loss_fn`` plus ``grad_norm`` and ``param_norm``
    of the trainable parameters.
  """
  rng = jax.random.fold_in(rng, state.step)
  trainable, frozen = optim.partition(state.params, mask)

  def objective(tr, b, key):
    return loss_fn(model, optim.merge(tr, frozen), b, key, **(loss_kwargs or {}))

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if microbatches == 1:
    (_, metrics), grads = grad_fn(trainable, batch, rng)
  else:
    if batch_dims is None:
      batch_dims = jax.tree.map(lambda _: 0, batch)
    micro = _split_microbatches(batch, batch_dims, microbatches, microbatch_shardings)

    def body(carry, xs):
      i, b = xs
      (_, m), g = grad_fn(trainable, b, jax.random.fold_in(rng, i))
      w = jnp.asarray(m.get("loss_weight", 1.0), jnp.float32)
      g_acc, m_acc, w_acc = carry
      g_acc = jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), g_acc, g)
      m_acc = {k: m_acc[k] + (jnp.asarray(v, jnp.float32) if k == "loss_weight"
                              else w * jnp.asarray(v, jnp.float32)) for k, v in m.items()}
      return (g_acc, m_acc, w_acc + w), None

    (_, m_shape), _ = jax.eval_shape(grad_fn, trainable,
                                     jax.tree.map(lambda x: x[0], micro), rng)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    zeros_m = {k: jnp.zeros(v.shape, jnp.float32) for k, v in m_shape.items()}
    (g_sum, m_sum, w_sum), _ = jax.lax.scan(
        body, (zeros_g, zeros_m, jnp.zeros((), jnp.float32)),
        (jnp.arange(microbatches), micro))
    denom = jnp.where(w_sum > 0, w_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, trainable)
    metrics = {k: (v if k == "loss_weight" else v / denom) for k, v in m_sum.items()}
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(trainable))
  new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                            opt_state=opt_state)
  return new_state, metrics


def param_shardings(model: nn.Module, init_args: tuple, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract boxed params, NamedSharding tree) from the model's logical axis names."""
  return param_shardings_of(
      lambda key: model.init(key, *init_args)["params"], mesh, rules)


def param_shardings_of(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules
                       ) -> tuple[Any, Any]:
  """Like :func:`param_shardings` for any ``init_fn(rng) -> boxed params`` (traced only).

  Returns (abstract unboxed params as ShapeDtypeStructs, NamedSharding tree); dims that do not
  split over their mesh axes are replicated (:func:`vlm.parallel.mesh.fit_shardings`).
  """
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  unboxed = nn.unbox(abstract)
  shardings = mesh_lib.fit_shardings(unboxed, shardings, log_fn=logging.getLogger("vlm").info)
  return unboxed, shardings


ParamsInit = Callable[[Any, Any], Any]


def create_train_state(model: nn.Module, init_args: tuple, rng: jax.Array,
                       tx: optax.GradientTransformation, frozen: list[str], mesh: Mesh, rules,
                       params_transform: Callable[[Any], Any] | None = None
                       ) -> tuple[TrainState, Any, dict]:
  """Initialises parameters and optimizer state directly in their shardings.

  Args:
    model: linen module; ``init_args`` are example inputs for ``model.init``.
    rng: init key.
    tx: optimizer for the trainable subtree.
    frozen: regexes of frozen parameter paths (see :func:`vlm.train.optim.trainable_mask`).
    mesh, rules: device mesh and logical-axis rules.
    params_transform: optional ``fn(params, shardings) -> params`` applied to the freshly
      initialised (sharded) params, e.g. loading pretrained weights; it must keep shapes and
      should return arrays in ``shardings`` (host arrays are placed with ``jax.device_put``).
  Returns:
    (state, state shardings, trainable mask).
  """
  return create_train_state_from_init(
      lambda key: model.init(key, *init_args)["params"], rng, tx, frozen, mesh, rules,
      params_transform=params_transform)


def create_train_state_from_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                                 tx: optax.GradientTransformation, frozen: list[str], mesh: Mesh,
                                 rules, params_transform: ParamsInit | None = None
                                 ) -> tuple[TrainState, Any, dict]:
  """:func:`create_train_state` for any ``init_fn(rng) -> boxed params`` (e.g. a task's
  ``init_model``). The parameters are created by ``jax.jit(init_fn, out_shardings=...)``: each
  device computes only its own shards, nothing is gathered to a host."""
  abstract, p_shard = param_shardings_of(init_fn, mesh, rules)
  mask = optim.trainable_mask(abstract, frozen)

  @functools.partial(jax.jit, out_shardings=p_shard)
  def init_params(key):
    return nn.unbox(init_fn(key))

  with jax.set_mesh(mesh):
    params = init_params(rng)
  if params_transform is not None:
    params = params_transform(params, p_shard)
    params = jax.tree.map(
        lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s else jax.device_put(x, s),
        params, p_shard)
  state_shardings = state_sharding_tree(params, p_shard, tx, mask, mesh)

  @functools.partial(jax.jit, out_shardings=state_shardings.opt_state)
  def init_opt(p):
    return tx.init(optim.partition(p, mask)[0])

  with jax.set_mesh(mesh):
    opt_state = init_opt(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state), state_shardings, mask


def state_sharding_tree(params, p_shard, tx, mask, mesh: Mesh) -> TrainState:
  """Shardings for every leaf of the TrainState: optimizer moments follow their parameter."""
  train_shard, _ = optim.partition(p_shard, mask)
  train_abstract, _ = optim.partition(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), mask)
  opt_abstract = jax.eval_shape(tx.init, train_abstract)
  repl = mesh_lib.replicated(mesh)
  # Optimizer states are pytrees containing copies of the parameter tree (mu, nu) plus scalars.
  flat_train = {tuple(path): s for path, s in
                flax.traverse_util.flatten_dict(train_shard).items()}

  def pick(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    for n in range(len(keys)):
      if keys[n:] in flat_train and flat_train[keys[n:]] is not None:
        cand = flat_train[keys[n:]]
        if len(cand.spec) <= leaf.ndim:
          return cand
    return repl

  opt_shard = jax.tree_util.tree_map_with_path(pick, opt_abstract)
  return TrainState(step=repl, params=p_shard, opt_state=opt_shard)


def batch_dims_from_axes(batch: Mapping[str, Any], axes: Mapping[str, Any] | None) -> Any:
  """Like ``batch``: the index of the ``"batch"`` logical axis of each array (0 when ``axes`` is
  None). Raises ValueError for an array whose axes do not contain ``"batch"`` exactly once."""
  from vlm.nn import partitioning as P

  out = {}
  for k, v in batch.items():
    if isinstance(v, Mapping):
      out[k] = batch_dims_from_axes(v, None if axes is None else axes[k])
    elif axes is None:
      out[k] = 0
    else:
      ax = tuple(axes[k])
      if ax.count(P.BATCH) != 1:
        raise ValueError(f"batch key {k!r} has logical axes {ax}; gradient accumulation needs "
                         f"exactly one {P.BATCH!r} axis in every batch array")
      out[k] = ax.index(P.BATCH)
  return out


def _microbatch_shardings(batch_example, axes, mesh, rules):
  """Shardings of the split arrays [n, .., B/n, ..]: the microbatch axis replicated, the rest as
  the batch array's own axes."""
  out = {}
  for k, v in batch_example.items():
    if isinstance(v, Mapping):
      out[k] = _microbatch_shardings(v, None if axes is None else axes[k], mesh, rules)
    else:
      ax = (tuple(axes[k]) if axes is not None else
            (mesh_lib.P.BATCH,) + (None,) * (len(v.shape) - 1))
      out[k] = mesh_lib.logical_sharding(mesh, rules, (None,) + ax)
  return out


def jit_train_step(model, tx, mask, loss_fn, loss_kwargs, state_shardings: TrainState,
                   mesh: Mesh, rules, batch_example: Mapping[str, Any], *,
                   batch_axes: Mapping[str, Any] | None = None, microbatches: int = 1):
  """``jax.jit`` of :func:`train_step` with in/out shardings and the state donated.

  Args:
    batch_example: a batch of the real structure (host arrays or ShapeDtypeStructs; only ranks
      and the key structure are used).
    batch_axes: logical axes per batch key, nested like the batch (see
      :func:`vlm.parallel.mesh.batch_shardings`); None = every array split on its leading axis
      over the mesh axes that ``BATCH`` maps to.
    microbatches: gradient accumulation (see :func:`train_step`).
  Raises:
    ValueError: batch keys and axes that do not match, or ``microbatches < 1``.
  """
  if microbatches < 1:
    raise ValueError(f"microbatches must be >= 1, got {microbatches}")
  shaped = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                        if not hasattr(x, "shape") else x, batch_example)
  batch_shard = mesh_lib.batch_shardings(mesh, rules, shaped, batch_axes)
  repl = mesh_lib.replicated(mesh)
  extra = {}
  if microbatches > 1:
    extra = dict(batch_dims=batch_dims_from_axes(shaped, batch_axes),
                 microbatch_shardings=_microbatch_shardings(shaped, batch_axes, mesh, rules))
  fn = functools.partial(train_step, model=model, tx=tx, mask=mask, loss_fn=loss_fn,
                         loss_kwargs=loss_kwargs, microbatches=microbatches, **extra)
  return jax.jit(fn, in_shardings=(state_shardings, batch_shard, repl),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))
