"""A fake task for the loop tests: a two-layer linear regression on random rows.

Everything the trainer needs, in a dozen functions, and deliberately unlike BLIP-2: other log
keys (``mse``, ``weight_sum``), throughput in ``tokens`` (the rows' loss-mask sum), a nested batch
key whose batch axis is not the leading one (``aux/pos`` [3, B], like Qwen's ``position_ids``), a
token-weighted loss that reports ``loss_weight`` (so gradient accumulation must weight
microbatches), and a held-out evaluator.

Batch (per process, b rows): ``x`` float32 [b, D], ``y`` float32 [b], ``loss_mask`` float32 [b]
(0, 1, 2 or 3: a row's number of "tokens"), ``aux``: {``pos`` int32 [3, b]}.
"""
from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from vlm.nn import partitioning as P

from tests.train.micro import set_dotted

LOG_KEYS = ("loss", "mse", "weight_sum")
THROUGHPUT_UNIT = "tokens"
D = 8


class Linear2(nn.Module):
  hidden: int = 16
  extra_layer: bool = False

  @nn.compact
  def __call__(self, x, pos):
    x = x + 0.01 * pos.sum(0)[:, None].astype(jnp.float32)
    h = nn.Dense(self.hidden, name="encoder",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (P.EMBED, P.MLP)))(x)
    if self.extra_layer:
      h = nn.Dense(self.hidden, name="extra")(h)
    return nn.Dense(1, name="head")(jnp.tanh(h))[:, 0]


def build_model(config):
  return Linear2(hidden=config.model.hidden, extra_layer=config.model.extra_layer)


def example_batch(config, batch_size=1):
  del config
  return {"x": np.zeros((batch_size, D), np.float32), "y": np.zeros((batch_size,), np.float32),
          "loss_mask": np.ones((batch_size,), np.float32),
          "aux": {"pos": np.zeros((3, batch_size), np.int32)}}


def init_model(model, rng, batch):
  return model.init(rng, batch["x"], batch["aux"]["pos"])["params"]


def batch_axes(config):
  del config
  return {"x": (P.BATCH, None), "y": (P.BATCH,), "loss_mask": (P.BATCH,),
          "aux": {"pos": (None, P.BATCH)}}


def _row(i: int, seed: int) -> dict:
  r = np.random.default_rng([seed, int(i)])
  x = r.normal(size=(D,)).astype(np.float32)
  return {"x": x, "y": np.float32(np.sin(x.sum())), "loss_mask": np.float32(r.integers(0, 4)),
          "pos": r.integers(0, 5, size=(3,)).astype(np.int32)}


def train_data(config, *, seed, process_index, process_count):
  """Process ``p`` of ``P`` gets rows ``[p*b, (p+1)*b)`` of each global batch (``b = B / P``), so
  the global batch (and the rows each device holds) is the same for any process count."""
  n = config.data.num_rows
  b = config.global_batch_size // process_count
  lo = process_index * b
  ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        .map(lambda i: _row(i, seed)).batch(config.global_batch_size)
        .map(lambda t: {"x": t["x"][lo:lo + b], "y": t["y"][lo:lo + b],
                        "loss_mask": t["loss_mask"][lo:lo + b],
                        "aux": {"pos": t["pos"][lo:lo + b].T.copy()}}))
  return iter(ds.to_iter_dataset()), {"rows": n}


def init_params(config, model, params, shardings):
  """``config.init.head_bias`` (if nonzero) written into the head bias through place_like."""
  del model
  value = config.init.get("head_bias", 0.0)
  if not value:
    return params
  from vlm.tasks import place_like
  params = dict(params)
  params["head"] = dict(params["head"], bias=place_like(np.full((1,), value, np.float32),
                                                        shardings["head"]["bias"]))
  return params


def loss_fn(model, params, batch, rng, *, weighted=True):
  del rng
  pred = model.apply({"params": params}, batch["x"], batch["aux"]["pos"])
  w = batch["loss_mask"]
  err = (pred - batch["y"]) ** 2
  wsum = w.sum()
  loss = (w * err).sum() / jnp.maximum(wsum, 1.0)
  metrics = {"loss": loss, "mse": err.mean(), "weight_sum": wsum}
  if weighted:
    metrics["loss_weight"] = wsum
  return loss, metrics


def count_units(batch):
  return int(np.asarray(batch["loss_mask"]).sum())


def evaluators(config):
  def heldout(model, params, step, *, writer=None):
    rows = [_row(i, 12345) for i in range(16)]
    x = np.stack([r["x"] for r in rows])
    y = np.stack([r["y"] for r in rows])
    pos = np.zeros((3, len(rows)), np.int32)
    pred = np.asarray(jax.device_get(model.apply({"params": params}, x, pos)))
    out = {"mse": float(((pred - y) ** 2).mean())}
    if writer is not None:
      writer.write(step, out, prefix="eval_heldout")
    return out
  return {"heldout": heldout} if config.eval.get("heldout", True) else {}


VALIDATED = []


def validate(config):
  VALIDATED.append(config.data.num_rows)


def get_config(**over):
  """The fake recipe's config; ``over`` maps dotted keys to values."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.task = "fake_linear"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(hidden=16, extra_layer=False))
  c.init = ml_collections.ConfigDict(dict(head_bias=0.0, workdir=""))
  c.data = ml_collections.ConfigDict(dict(num_rows=128))
  c.loss = ml_collections.ConfigDict(dict(weighted=True))
  c.total_steps = 4
  c.global_batch_size = 32
  c.microbatches = 1
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=1, total_steps=c.get_ref("total_steps"),
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0, frozen=[],
      lr_multipliers=[]))
  c.mesh = ml_collections.ConfigDict(dict(shape={"data": 2, "fsdp": -1, "tensor": 1}, rules=None))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2, max_to_keep=3, async_save=False))
  c.log_every_steps = 1
  c.eval = ml_collections.ConfigDict(dict(at_end=True, heldout=True))
  return set_dotted(c, over)
