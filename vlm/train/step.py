"""The pure training step and the helpers that create a sharded state and jit the step once.

``train_step(state, batch, rng) -> (state, metrics)`` is a pure function of arrays; the model,
optimizer, trainable mask and loss are bound with ``functools.partial`` before ``jax.jit``.
The step folds the state's step counter into ``rng``, so a resumed run draws exactly the dropout
masks and hard negatives that an uninterrupted run would.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from vlm.parallel import mesh as mesh_lib
from vlm.train import optim
from vlm.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, mask: Mapping[tuple, bool],
               loss_fn: LossFn, loss_kwargs: Mapping[str, Any] | None = None
               ) -> tuple[TrainState, dict]:
  """One optimizer step on the trainable parameters.

  Args:
    state: current state.
    batch: global batch (dict of arrays, leading axis = global batch).
    rng: base PRNG key of the run (the step number is folded in here).
    model, tx, mask, loss_fn, loss_kwargs: bound statically.
  Returns:
    (new state, metrics): the loss parts from ``loss_fn`` plus ``grad_norm`` and ``param_norm``
    of the trainable parameters.
  """
  rng = jax.random.fold_in(rng, state.step)
  trainable, frozen = optim.partition(state.params, mask)

  def objective(tr):
    return loss_fn(model, optim.merge(tr, frozen), batch, rng, **(loss_kwargs or {}))

  (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(trainable))
  new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                            opt_state=opt_state)
  return new_state, metrics


def param_shardings(model: nn.Module, init_args: tuple, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract boxed params, NamedSharding tree) from the model's logical axis names."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args)["params"])
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  unboxed = nn.unbox(abstract)
  shardings = mesh_lib.fit_shardings(unboxed, shardings, log_fn=logging.getLogger("vlm").info)
  return unboxed, shardings


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
    params_transform: optional host-side function applied to freshly initialised params (e.g.
      loading pretrained BERT weights); it must keep shapes.
  Returns:
    (state, state shardings, trainable mask).
  """
  abstract, p_shard = param_shardings(model, init_args, mesh, rules)
  mask = optim.trainable_mask(abstract, frozen)

  @functools.partial(jax.jit, out_shardings=p_shard)
  def init_params(key):
    return nn.unbox(model.init(key, *init_args)["params"])

  with jax.set_mesh(mesh):
    params = init_params(rng)
  if params_transform is not None:
    params = jax.device_put(params_transform(params), p_shard)
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


def jit_train_step(model, tx, mask, loss_fn, loss_kwargs, state_shardings: TrainState,
                   mesh: Mesh, rules, batch_example: Mapping[str, Any]):
  """``jax.jit`` of :func:`train_step` with in/out shardings and the state donated.

  The batch sharding splits the leading axis over the mesh axes that ``BATCH`` maps to.
  """
  batch_shard = {k: mesh_lib.batch_sharding(mesh, rules, len(v.shape))
                 for k, v in batch_example.items()}
  repl = mesh_lib.replicated(mesh)
  fn = functools.partial(train_step, model=model, tx=tx, mask=mask, loss_fn=loss_fn,
                         loss_kwargs=loss_kwargs)
  return jax.jit(fn, in_shardings=(state_shardings, batch_shard, repl),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))
