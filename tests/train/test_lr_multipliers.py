"""Learning-rate multipliers per parameter group (config.optim.lr_multipliers, first match wins)."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm.train import optim

PARAMS = {"visual": {"blocks": {"kernel": jnp.ones((3, 4))}, "merger": {"kernel": jnp.ones((4, 2))}},
          "language_model": {"layers": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}}
GRADS = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), PARAMS)
RULES = [(r"^visual/merger", 1.0), (r"^visual/", 0.1), (r"^language_model/", 0.5)]


def _cfg(**over):
  c = ml_collections.ConfigDict(dict(lr=1e-2, min_lr=1e-2, warmup_lr=1e-2, warmup_steps=0,
                                     total_steps=10, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
                                     grad_clip_norm=0.0, lr_multipliers=[]))
  c.update(over)
  return c


def test_first_match_wins_and_default_is_one():
  m = optim.lr_multipliers(PARAMS, RULES)
  assert m["visual"]["merger"]["kernel"] == 1.0 and m["visual"]["blocks"]["kernel"] == 0.1
  assert m["language_model"]["layers"]["bias"] == 0.5
  assert optim.lr_multipliers(PARAMS, [(r"^visual/", 0.1)])["language_model"]["layers"][
      "kernel"] == 1.0


@pytest.mark.parametrize("rules,msg", [([(r"^vision_tower/", 0.1)], "matches no trainable"),
                                       ([(r"^visual/", -1.0)], ">= 0"),
                                       ([("x",)], "pairs")])
def test_bad_rules_are_clear_errors(rules, msg):
  with pytest.raises(ValueError, match=msg):
    optim.lr_multipliers(PARAMS, rules)


def test_sgd_update_is_the_multiple_of_the_base_update():
  base = optax.sgd(0.3)
  scaled = optax.chain(optax.sgd(0.3), optim.scale_by_lr_multipliers(RULES))
  u0, _ = base.update(GRADS, base.init(PARAMS), PARAMS)
  u1, _ = scaled.update(GRADS, scaled.init(PARAMS), PARAMS)
  mult = optim.lr_multipliers(PARAMS, RULES)
  chex.assert_trees_all_close(u1, jax.tree.map(lambda u, m: m * u, u0, mult), rtol=1e-7)
  assert float(jnp.abs(u1["visual"]["blocks"]["kernel"]).sum()) > 0


def test_adamw_group_update_is_scaled_and_no_rules_keep_the_state_structure():
  tx0 = optim.make_optimizer(_cfg())
  tx1 = optim.make_optimizer(_cfg(lr_multipliers=RULES))
  s0, s1 = tx0.init(PARAMS), tx1.init(PARAMS)
  assert len(s0) == 1 and len(s1) == 2  # an empty list adds nothing (old checkpoints resume)
  for _ in range(3):  # several steps: the moments are the same, only the step size differs
    u0, s0 = tx0.update(GRADS, s0, PARAMS)
    u1, s1 = tx1.update(GRADS, s1, PARAMS)
  for path, m in (("visual/blocks/kernel", 0.1), ("visual/merger/kernel", 1.0),
                  ("language_model/layers/kernel", 0.5), ("language_model/layers/bias", 0.5)):
    a, b = u0, u1
    for k in path.split("/"):
      a, b = a[k], b[k]
    np.testing.assert_allclose(np.asarray(b), m * np.asarray(a), rtol=1e-6, err_msg=path)
    assert float(jnp.abs(a).max()) > 0
