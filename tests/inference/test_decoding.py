"""vlm.inference.decoding (beam search and the greedy/sampling loop) on a tiny synthetic "model".

The model is a table: the logits after token ``x_t`` at position ``t`` are ``T[x_t] +
U[x_{t-1}] + P[t]`` (so a wrong cache reorder, which loses ``x_{t-1}``, or a wrong cache index
shows). Its cache holds the previous token twice, on batch axes 0 and 1, to exercise
``cache_batch_axes``. Stop ids are made frequent so that beams end early.

References: (a) a pure numpy port of the semantics of HF transformers 4.57.1 ``_beam_search``
written here from its structure (``max(2, 1 + #eos) * num_beams`` candidates, -1e9 masks, merged
finished pool, ``_check_early_stop_heuristic``, whole-batch stopping), and (b) HF ``generate``
itself on the same table wrapped as a ``PreTrainedModel``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from vlm.inference import decoding

V, PAD, WIDTH, LMAX = 12, 11, 16, 40
PROMPTS = np.array([[1, 2], [3, 4], [5, 6]])
AXES = {"prev": 0, "prev2": 1}


def _tables(seed=0, eos=(7,), bias=1.5):
  rng = np.random.default_rng(seed)
  t = rng.standard_normal((V, V)).astype(np.float32) * 2
  t[:, list(eos)] += bias  # frequent stop ids
  t[:, PAD] -= 20.0  # the pad id is never generated, so PAD in an output means "ended"
  u = rng.standard_normal((V, V)).astype(np.float32)
  p = rng.standard_normal((LMAX, V)).astype(np.float32)
  return t, u, p


def _logits_np(tables, seq):
  """Logits after the last token of the full sequence ``seq`` (prompt + generated)."""
  t, u, p = tables
  n = len(seq)
  prev = seq[-2] if n > 1 else seq[-1]
  return (t[seq[-1]] + u[prev] + p[n - 1]).astype(np.float32)


def _prefill(tables, prompts):
  t, u, p = (jnp.asarray(x) for x in tables)
  ids = jnp.asarray(prompts, jnp.int32)
  first = t[ids[:, -1]] + u[ids[:, -2]] + p[ids.shape[1] - 1]
  return first, {"prev": ids[:, -1], "prev2": ids[None, :, -1]}


def _step(tables):
  def step(params, tok, cache, index):
    t, u, p = params
    logits = t[tok] + 0.5 * (u[cache["prev"]] + u[cache["prev2"][0]]) + p[index]
    return logits, {"prev": tok, "prev2": tok[None]}
  return step


def _eos(ids):
  ids = list(ids)
  return jnp.asarray(ids + [-1] * (-len(ids) % 8), jnp.int32)


@functools.lru_cache(maxsize=None)
def _beam_fn(num_beams, length_penalty, early_stopping):
  def run(params, first, cache, max_new, eos, min_new, done):
    return decoding.beam_search(_step(None), params, first, cache, AXES, start_index=PROMPTS.shape[1],
                                width=WIDTH, num_beams=num_beams, max_new_tokens=max_new, eos=eos,
                                pad_token_id=PAD, length_penalty=length_penalty,
                                early_stopping=early_stopping, min_new_tokens=min_new, done=done)
  return jax.jit(run)


def _vlm_beam(tables, num_beams, length_penalty, early_stopping, max_new, eos, min_new=0,
              done=None):
  first, cache = _prefill(tables, PROMPTS)
  b = PROMPTS.shape[0]
  done = np.zeros(b, bool) if done is None else np.asarray(done)
  tok, scores = _beam_fn(num_beams, length_penalty, early_stopping)(
      tuple(jnp.asarray(x) for x in tables), first, cache, jnp.int32(max_new), _eos(eos),
      jnp.int32(min_new), jnp.asarray(done))
  return np.asarray(tok), np.asarray(scores)


def _ref_beam(tables, prompts, num_beams, length_penalty, early_stopping, max_new, eos,
              min_new=0):
  """numpy port of HF 4.57.1 ``_beam_search`` (do_sample=False, one returned sequence).
  Returns (new tokens [B, WIDTH] padded with PAD, sequences_scores [B])."""
  b, lp0 = prompts.shape
  n = num_beams
  eos = list(eos)
  k = max(2, 1 + len(eos)) * n
  neg = np.float32(-1e9)
  run_seq = [[list(prompts[i])] * n for i in range(b)]
  run_score = np.tile(np.array([0.0] + [-1e9] * (n - 1), np.float32), (b, 1))
  fin_seq = [[list(prompts[i])] * n for i in range(b)]
  fin_score = np.full((b, n), neg, np.float32)
  fin_done = np.zeros((b, n), bool)
  unsat = np.ones(b, bool)
  topk = lambda x, m: np.argsort(-x, kind="stable")[:m]
  for i in range(max_new):
    cur = lp0 + i
    hits_all = np.zeros((b, k), bool)
    new_run = []
    for r in range(b):
      lps = []
      for j in range(n):
        x = _logits_np(tables, run_seq[r][j]).astype(np.float64)
        lp = (x - np.log(np.exp(x - x.max()).sum()) - x.max()).astype(np.float32)
        if i < min_new:
          lp[eos] = -np.inf
        lps.append(lp + run_score[r, j])
      flat = np.concatenate(lps)
      idx = topk(flat, k)
      cand_score = flat[idx]
      cand_seq = [run_seq[r][c // V] + [int(c % V)] for c in idx]
      hits = np.array([s[-1] in eos or cur + 1 >= lp0 + max_new for s in cand_seq])
      hits_all[r] = hits
      # running: best n of the k, finished ones pushed down by 1e9
      rs = cand_score + hits.astype(np.float32) * neg
      keep = topk(rs, n)
      new_run.append(([cand_seq[c] for c in keep], rs[keep]))
      # finished pool
      just = hits & (np.arange(k) < n)
      fs = cand_score / np.float32((cur + 1 - lp0) ** length_penalty)
      full = fin_done[r].all() and early_stopping is True
      fs = fs + np.float32(full) * neg + np.float32(not unsat[r]) * neg + (~just) * neg
      m_score = np.concatenate([fin_score[r], fs.astype(np.float32)])
      m_seq = fin_seq[r] + cand_seq
      m_done = np.concatenate([fin_done[r], just])
      keep = topk(m_score, n)
      fin_score[r], fin_done[r] = m_score[keep], m_done[keep]
      fin_seq[r] = [m_seq[c] for c in keep]
    for r in range(b):
      run_seq[r], run_score[r] = new_run[r][0], new_run[r][1]
    cur += 1
    for r in range(b):
      if early_stopping == "never" and length_penalty > 0:
        best_len = lp0 + max_new - lp0
      else:
        best_len = cur - lp0
      best = run_score[r, 0] / np.float32(best_len ** length_penalty)
      worst = np.where(fin_done[r], fin_score[r].min(), neg)
      unsat[r] = unsat[r] and bool((best > worst).any())
    open_beam = not (fin_done.all() and early_stopping is True)
    if not (unsat.any() and open_beam and not hits_all.all()):
      break
  out = np.full((b, WIDTH), PAD, np.int64)
  for r in range(b):
    new = fin_seq[r][0][lp0:]
    out[r, :len(new)] = new
  return out, fin_score[:, 0]


class _TableLM(PreTrainedModel, GenerationMixin):
  """The synthetic table as an HF causal LM (no cache: every step sees the whole sequence)."""
  config_class = PretrainedConfig

  def __init__(self, config, tables):
    super().__init__(config)
    self.t, self.u, self.p = (torch.tensor(x) for x in tables)
    self.dummy = torch.nn.Parameter(torch.zeros(1))

  def forward(self, input_ids, **kw):
    prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], 1)
    return CausalLMOutput(logits=self.t[input_ids] + self.u[prev]
                          + self.p[:input_ids.shape[1]][None])

  def prepare_inputs_for_generation(self, input_ids, **kw):
    return {"input_ids": input_ids}


def _hf(tables, eos, max_new, **kw):
  model = _TableLM(PretrainedConfig(vocab_size=V), tables)
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(PROMPTS), do_sample=False, use_cache=False,
                         max_new_tokens=max_new, eos_token_id=list(eos), pad_token_id=PAD,
                         return_dict_in_generate=True, output_scores=True, **kw)
  seq = out.sequences.numpy()[:, PROMPTS.shape[1]:]
  full = np.full((len(seq), WIDTH), PAD, np.int64)
  full[:, :seq.shape[1]] = seq
  scores = None if out.get("sequences_scores") is None else out.sequences_scores.numpy()
  return full, scores


CASES = [  # (num_beams, length_penalty, early_stopping, max_new, eos, min_new, seed)
    (3, 1.0, False, 12, (7,), 0, 12),  # seed 12: the early-stop heuristic closes a row
    (3, 1.0, True, 12, (7,), 0, 2),  # seed 2: a row with num_beams finished takes no more
    (4, 0.0, False, 12, (7,), 0, 2),
    (4, 0.0, True, 12, (7, 9), 0, 3),
    (3, -1.0, False, 9, (7,), 0, 4),
    (3, -1.0, True, 9, (7, 9), 2, 5),
    (3, 2.0, False, 12, (7,), 0, 0),
    (3, 2.0, True, 14, (7,), 3, 7),
    (3, 2.0, "never", 11, (7, 9), 0, 8),
    (2, 1.0, "never", 8, (7,), 4, 9),
]


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-lp{c[1]}-es{c[2]}-min{c[5]}" for c in CASES])
def test_beam_search_matches_reference(case):
  n, lpen, es, max_new, eos, min_new, seed = case
  tables = _tables(seed, eos)
  want, want_scores = _ref_beam(tables, PROMPTS, n, lpen, es, max_new, eos, min_new)
  got, scores = _vlm_beam(tables, n, lpen, es, max_new, eos, min_new)
  print("ref", want.tolist(), "\nvlm", got.tolist())
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  # the stop ids end some hypotheses before max_new_tokens, and the outputs differ across rows
  assert (got[:, :max_new] == PAD).any() or min_new
  if min_new:  # no stop id among the first min_new tokens
    assert not np.isin(got[:, :min_new], eos).any()


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7], CASES[8]],
                         ids=["lp1", "lp0-es-2eos", "lp2-es-min3", "never"])
def test_beam_search_matches_hf(case):
  n, lpen, es, max_new, eos, min_new, seed = case
  tables = _tables(seed, eos)
  want, want_scores = _hf(tables, eos, max_new, num_beams=n, length_penalty=lpen,
                          early_stopping=es, min_new_tokens=min_new)
  got, scores = _vlm_beam(tables, n, lpen, es, max_new, eos, min_new)
  print("hf ", want.tolist(), "\nvlm", got.tolist())
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_done_rows_and_repeated_cache():
  tables = _tables(0)
  want, _ = _ref_beam(tables, PROMPTS, 3, 1.0, False, 12, (7,))
  got, scores = _vlm_beam(tables, 3, 1.0, False, 12, (7,), done=[False, True, False])
  np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
  assert (got[1] == PAD).all() and scores[1] == 0
  # a cache already repeated for the beams (B * num_beams rows) gives the same result
  first, cache = _prefill(tables, PROMPTS)
  rep = decoding.repeat_cache(cache, AXES, 3)
  assert rep["prev"].tolist() == np.repeat(PROMPTS[:, -1], 3).tolist()
  assert rep["prev2"].shape == (1, 9)
  tok, _ = decoding.beam_search(_step(None), tuple(jnp.asarray(x) for x in tables), first, rep,
                                AXES, start_index=2, width=WIDTH, num_beams=3,
                                max_new_tokens=jnp.int32(12), eos=_eos((7,)), pad_token_id=PAD)
  np.testing.assert_array_equal(np.asarray(tok), want)
  with pytest.raises(ValueError, match="rows"):
    decoding.beam_search(_step(None), tables, first, decoding.repeat_cache(cache, AXES, 2), AXES,
                         start_index=2, width=WIDTH, num_beams=3, max_new_tokens=10,
                         eos=_eos((7,)), pad_token_id=PAD)
  with pytest.raises(ValueError, match="early_stopping"):
    decoding.beam_search(_step(None), tables, first, cache, AXES, start_index=2, width=WIDTH,
                         num_beams=3, max_new_tokens=10, eos=_eos((7,)), pad_token_id=PAD,
                         early_stopping="sometimes")


def _ref_greedy(tables, max_new, eos, min_new):
  out = np.full((len(PROMPTS), WIDTH), PAD, np.int64)
  for r, p in enumerate(PROMPTS):
    seq = list(p)
    for i in range(max_new):
      x = _logits_np(tables, seq)
      if i < min_new:
        x[list(eos)] = -np.inf
      seq.append(int(np.argmax(x)))
      out[r, i] = seq[-1]
      if seq[-1] in eos:
        break
  return out


@pytest.mark.parametrize("min_new", [0, 3])
def test_greedy_loop_matches_reference_and_hf(min_new):
  eos = (7, 9)
  tables = _tables(10, eos, bias=2.5)
  first, cache = _prefill(tables, PROMPTS)
  params = tuple(jnp.asarray(x) for x in tables)
  run = jax.jit(functools.partial(decoding.sample_loop, _step(None), start_index=2, width=WIDTH,
                                  pad_token_id=PAD))
  got, steps = run(params, first, cache, max_new_tokens=jnp.int32(10), eos=_eos(eos),
                   min_new_tokens=jnp.int32(min_new), done=jnp.asarray([False, False, True]))
  want = _ref_greedy(tables, 10, eos, min_new)
  print("ref", want.tolist(), "\nvlm", np.asarray(got).tolist())
  np.testing.assert_array_equal(np.asarray(got)[:2], want[:2])
  assert (np.asarray(got)[2] == PAD).all()
  assert (want[:2, :10] == PAD).any()  # a stop id ends a row early
  np.testing.assert_array_equal(_hf(tables, eos, 10, min_new_tokens=min_new)[0][:2], want[:2])
  assert 0 < int(steps) <= 9
  # sampling: reproducible per key; top_k=1 is greedy
  sample = jax.jit(functools.partial(decoding.sample_loop, _step(None), start_index=2,
                                     width=WIDTH, pad_token_id=PAD, temperature=0.9, top_k=1))
  s = sample(params, first, cache, max_new_tokens=jnp.int32(10), eos=_eos(eos),
             min_new_tokens=jnp.int32(min_new), rng=jax.random.PRNGKey(3))[0]
  np.testing.assert_array_equal(np.asarray(s), want)
