"""Optimizer from a config: AdamW, warmup + cosine schedule, decay masks, frozen parameter groups.

Parameters are addressed by their '/'-joined path (e.g. ``vision_model/encoder/layers_0/mlp/fc1/kernel``).
``config.optim.frozen`` is a list of regexes: a parameter whose path matches any of them is frozen.
Frozen parameters are split off before differentiation (:func:`partition`), so they get neither a
gradient nor optimizer state; the optimizer only ever sees the trainable subtree.

Weight decay (BLIP-2 spec section 6.3, the paper-era LAVIS rule): no decay for parameters with fewer
than 2 dims (biases, LayerNorm scales, ``temp``) or whose name ends in ``bias``/``scale``; decay for
everything else (kernels, embeddings, ``query_tokens``).

Learning-rate multipliers per parameter group: ``config.optim.lr_multipliers`` is a list of
``(regex, multiplier)`` pairs; a trainable parameter takes the multiplier of the first regex that
matches its path (default 1.0), e.g. ``[(r"^visual/(?!merger)", 0.1), (r"^visual/merger", 1.0),
(r"^language_model/", 0.5)]``. The whole AdamW update of the parameter (including its decoupled
weight decay) is scaled, which is what a PyTorch parameter group with ``lr = m * base_lr`` does.
An empty list adds nothing to the optimizer (its state keeps the same structure).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

Params = Any


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def trainable_mask(params: Params, frozen: Sequence[str]) -> dict:
  """Flat dict path-tuple -> bool (True = trainable) for every leaf of ``params``.

  Raises:
    ValueError: a regex that matches no parameter (a typo would otherwise silently train the
      tower) or that matches every parameter.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  pats = [re.compile(p) for p in frozen]
  for pat in pats:
    if not any(pat.search(path_str(k)) for k in flat):
      raise ValueError(f"frozen pattern {pat.pattern!r} matches no parameter; parameter paths "
                       f"look like {path_str(next(iter(flat)))!r}")
  mask = {k: not any(p.search(path_str(k)) for p in pats) for k in flat}
  if flat and not any(mask.values()):
    raise ValueError(f"frozen patterns {list(frozen)} freeze every parameter; nothing to train")
  return mask


def partition(params: Params, mask: Mapping[tuple, bool]) -> tuple[dict, dict]:
  """Splits ``params`` into (trainable, frozen) nested dicts with disjoint leaves."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  train = {k: v for k, v in flat.items() if mask[k]}
  frozen = {k: v for k, v in flat.items() if not mask[k]}
  return (flax.traverse_util.unflatten_dict(train), flax.traverse_util.unflatten_dict(frozen))


def merge(trainable: Params, frozen: Params) -> dict:
  """Inverse of :func:`partition`."""
  flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen)))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(trainable)))
  return flax.traverse_util.unflatten_dict(flat)


def decay_mask(params: Params) -> Params:
  """Pytree of bools like ``params``: True where weight decay applies."""
  def rule(path, leaf):
    name = path_str(tuple(getattr(k, "key", k) for k in path))
    return leaf.ndim >= 2 and not re.search(r"(bias|scale)$", name)
  return jax.tree_util.tree_map_with_path(rule, params)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``
  at ``total_steps`` (per-step version of LAVIS ``linear_warmup_cosine_lr``; spec section 6.3).

  Raises:
    ValueError: a warmup as long as training or longer, or non-positive total steps.
  """
  if cfg.total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {cfg.total_steps}")
  if cfg.warmup_steps >= cfg.total_steps:
    raise ValueError(f"optim.warmup_steps ({cfg.warmup_steps}) must be smaller than total_steps "
                     f"({cfg.total_steps}): set --config.optim.warmup_steps lower (the cosine "
                     "decay needs at least one step after the warmup)")
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.warmup_lr, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.total_steps, end_value=cfg.min_lr)


def lr_multipliers(params: Params, rules: Sequence[Sequence[Any]]) -> Params:
  """Pytree like ``params`` of float multipliers: the first matching ``(regex, multiplier)`` of
  ``rules`` for each leaf path (``/``-joined), 1.0 where none matches.

  Raises:
    ValueError: a rule that is not a (regex, number) pair, a negative multiplier, or a regex that
      matches no parameter (the message gives an example path).
  """
  compiled = []
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      raise ValueError(f"lr_multipliers entries must be (regex, multiplier) pairs, got {rule!r}")
    pat, mult = rule
    if not isinstance(mult, (int, float)) or mult < 0:
      raise ValueError(f"lr multiplier for {pat!r} must be a number >= 0, got {mult!r}")
    compiled.append((re.compile(pat), float(mult)))

  def path_of(path):
    return path_str(tuple(getattr(k, "key", getattr(k, "name", k)) for k in path))

  paths = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pat, _ in compiled:
    if paths and not any(pat.search(p) for p in paths):
      raise ValueError(f"lr_multipliers pattern {pat.pattern!r} matches no trainable parameter; "
                       f"parameter paths look like {paths[0]!r}")

  def pick(path, leaf):
    name = path_of(path)
    for pat, mult in compiled:
      if pat.search(name):
        return mult
    return 1.0

  return jax.tree_util.tree_map_with_path(pick, params)


def scale_by_lr_multipliers(rules: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
  """Stateless transformation: each update leaf times its group's multiplier
  (:func:`lr_multipliers`)."""
  rules = [tuple(r) for r in rules]

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, rules)
    updates = jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates,
                           mults)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps, weight_decay with :func:`decay_mask`) on a schedule, with optional global
  gradient-norm clipping (``cfg.grad_clip_norm``; 0 disables it) and optional per-group
  learning-rate multipliers (``cfg.lr_multipliers``, see :func:`lr_multipliers`). Applied to
  trainable params only.
  """
  schedule = learning_rate_schedule(cfg)
  chain = []
  if cfg.get("grad_clip_norm", 0.0):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  multipliers = list(cfg.get("lr_multipliers", None) or [])
  if multipliers:
    chain.append(scale_by_lr_multipliers(multipliers))
  return optax.chain(*chain)
