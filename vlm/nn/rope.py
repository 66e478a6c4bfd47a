"""Rotary position embeddings (RoPE) as composable frequency assignments.

Every rotary variant used by the Qwen families is the same rotation with a different **frequency
matrix** (architecture.md, "RoPE as composable frequency assignment"). A head whose rotary width is
``R`` has ``R/2`` rotation planes; plane ``j`` turns by ``<Omega[:, j], p>``, where ``p`` is the token's
position vector along ``A`` axes (1 for text, (h, w) for the Qwen ViT, (t, h, w) for MRoPE). A variant
is therefore a function returning ``Omega`` of shape ``[A, R/2]``:

* spectra: :func:`inverse_frequencies` (``theta^(-2j/d)``) and the scaling rules
  :func:`linear_scaling`, :func:`ntk_scaling`, :func:`yarn_scaling`, :func:`llama3_scaling`
  (``rope_init`` dispatches on an HF ``rope_scaling`` dict like ``ROPE_INIT_FUNCTIONS``);
* assignments: :func:`one_axis`, :func:`axial` (Qwen ViT 2-D), :func:`sections` (Qwen2/2.5-VL MRoPE),
  :func:`interleaved` (Qwen3-VL MRoPE);
* application: :func:`angles` (``positions x Omega``), :func:`cos_sin`, :func:`apply_rotary`,
  :func:`rotate`;
* one-line compositions: :func:`text_rope`, :func:`mrope`, :func:`vision_rope`.

Named axes: ``A`` position axes, ``L`` sequence length, ``H`` heads, ``D`` head dim, ``R`` rotary
width (``R <= D``; the first ``R`` features rotate, the rest pass through), ``n = R/2`` planes.
All angles, cos and sin are float32.

Sources: qwen3vl_spec.md sections 3.3 (vision 2-D RoPE), 6 (MRoPE), 11 items 2-5, 21;
HF transformers 4.57.1 ``modeling_rope_utils.py`` (scaling rules), ``qwen3/modeling_qwen3.py``
(1-D RoPE, ``rotate_half``), ``qwen2_5_vl/modeling_qwen2_5_vl.py`` (sectioned MRoPE),
``qwen3_vl/modeling_qwen3_vl.py`` (interleaved MRoPE, vision rotary embedding).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAIRINGS = ("half", "interleaved")


# ----------------------------------------------------------------------------------------------
# Spectra
# ----------------------------------------------------------------------------------------------

def _check_dim(dim, name="dim"):
  if not isinstance(dim, (int, np.integer)) or dim <= 0 or dim % 2:
    raise ValueError(f"{name} must be a positive even int (the rotary width), got {dim!r}")


def _check_positive(value, name):
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
  """The classic RoPE spectrum ``inv[j] = theta ** (-2j / dim)``, ``j = 0 .. dim/2 - 1``.

  Computed on the host as HF/torch does in float32: exponent ``float32(2j) / float32(dim)``, power
  in float64 rounded to float32 (torch's float32 ``pow`` is at most 1 ulp off this for a few
  indices, spec section 11 item 21), then the reciprocal in float32. ``dim`` and ``theta`` must be
  static Python numbers (the result is a constant under ``jax.jit``).

  Args:
    dim: rotary width ``R`` (positive, even). For the Qwen ViT this is ``head_dim / 2`` (spec 3.3).
    theta: RoPE base (``rope_theta``), > 0.
  Returns:
    ``[dim/2]`` float32.
  Raises:
    ValueError: odd or non-positive ``dim``; non-positive ``theta``.
  Source: HF ``_compute_default_rope_parameters``; qwen3vl_spec.md 6.1.
  """
  _check_dim(dim)
  _check_positive(theta, "theta")
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
  return jnp.asarray(np.float32(1.0) / power, dtype=jnp.float32)


def linear_scaling(inv: jax.Array, factor: float) -> jax.Array:
  """Linear position interpolation: ``inv / factor`` (positions effectively divided by factor).

  Args:
    inv: ``[n]`` float32 spectrum.
    factor: scaling factor, > 0.
  Returns:
    ``[n]`` float32. (Attention factor of this rule: 1.0.)
  Source: HF ``_compute_linear_scaling_rope_parameters``.
  """
  _check_positive(factor, "factor")
  return jnp.asarray(inv, jnp.float32) / jnp.float32(factor)


def ntk_scaling(dim: int, theta: float, factor: float, max_position_embeddings: int,
                seq_len: int | None = None) -> jax.Array:
  """Dynamic NTK scaling: the default spectrum with an enlarged base.

  ``base = theta * (factor * s / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))`` with
  ``s = max(seq_len, max_position_embeddings)`` (``s = max_position_embeddings`` when ``seq_len`` is
  None, which leaves the spectrum unchanged, as HF does at init). ``seq_len`` is static (in a jitted
  model it is the static sequence length).

  Args:
    dim: rotary width (even, > 2).
    theta: RoPE base.
    factor: scaling factor, > 0.
    max_position_embeddings: the context length the model was trained at.
    seq_len: current sequence length or None.
  Returns:
    ``[dim/2]`` float32. (Attention factor of this rule: 1.0.)
  Raises:
    ValueError: bad ``dim``/``theta``/``factor``/``max_position_embeddings``.
  Source: HF ``_compute_dynamic_ntk_parameters``.
  """
  _check_dim(dim)
  if dim <= 2:
    raise ValueError(f"dynamic NTK scaling needs dim > 2, got {dim}")
  _check_positive(factor, "factor")
  _check_positive(max_position_embeddings, "max_position_embeddings")
  s = max_position_embeddings if seq_len is None else max(int(seq_len), max_position_embeddings)
  base = theta * ((factor * s / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
  return inverse_frequencies(dim, base)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def yarn_scaling(inv: jax.Array, dim: int, theta: float, factor: float,
                 original_max_position_embeddings: int, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, *, attention_factor: float | None = None,
                 mscale: float | None = None, mscale_all_dim: float | None = None,
                 truncate: bool = True) -> tuple[jax.Array, float]:
  """YaRN: per-plane blend of the original (extrapolated) and ``inv/factor`` (interpolated) spectra.

  Planes turning more than ``beta_fast`` times over the original context keep ``inv``; planes
  turning fewer than ``beta_slow`` times use ``inv / factor``; a linear ramp over plane indices
  ``[low, high]`` blends in between, with
  ``low/high = dim * ln(L0 / (beta * 2 pi)) / (2 ln theta)`` (floored/ceiled when ``truncate``),
  clamped to ``[0, dim - 1]``. cos and sin are then multiplied by the attention factor, by default
  ``0.1 ln(factor) + 1`` (or ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both
  are given).

  Args:
    inv: ``[dim/2]`` float32 default spectrum (``inverse_frequencies(dim, theta)``).
    dim: rotary width.
    theta: RoPE base.
    factor: context extension factor, > 0.
    original_max_position_embeddings: pretraining context length ``L0``.
    beta_fast, beta_slow: ramp boundaries in rotations.
    attention_factor: explicit cos/sin multiplier (overrides the formula).
    mscale, mscale_all_dim: optional DeepSeek-style attention-factor terms.
    truncate: round the ramp boundaries outward to integers.
  Returns:
    ``(inv [dim/2] float32, attention_factor: float)``.
  Raises:
    ValueError: ``inv`` length not ``dim/2``; non-positive factor/theta/context.
  Source: HF ``_compute_yarn_parameters`` (arXiv 2309.00071).
  """
  _check_dim(dim)
  _check_positive(theta, "theta")
  _check_positive(factor, "factor")
  _check_positive(original_max_position_embeddings, "original_max_position_embeddings")
  inv = jnp.asarray(inv, jnp.float32)
  if inv.shape != (dim // 2,):
    raise ValueError(f"inv must have shape ({dim // 2},) for dim={dim}, got {inv.shape}")
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    else:
      attention_factor = _yarn_mscale(factor)

  def correction_dim(rotations):
    return (dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))) / (
        2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # the reference's guard against a zero-width ramp
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - jnp.float32(low))
                  / jnp.float32(high - low), 0.0, 1.0)
  extrapolation = 1.0 - ramp
  interpolated = inv / jnp.float32(factor)
  out = interpolated * (1.0 - extrapolation) + inv * extrapolation
  return out, float(attention_factor)


def llama3_scaling(inv: jax.Array, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> jax.Array:
  """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth blend between.

  With ``wavelen = 2 pi / inv``: ``wavelen > L0/low_freq_factor`` -> ``inv/factor``;
  ``wavelen < L0/high_freq_factor`` -> ``inv``; otherwise ``(1-s) inv/factor + s inv`` with
  ``s = (L0/wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

  Args:
    inv: ``[n]`` float32 default spectrum.
    factor, low_freq_factor, high_freq_factor: the rule's constants (8, 1, 4 for Llama 3.1).
    original_max_position_embeddings: ``L0`` (8192 for Llama 3.1).
  Returns:
    ``[n]`` float32. (Attention factor of this rule: 1.0.)
  Raises:
    ValueError: non-positive constants or ``high_freq_factor == low_freq_factor``.
  Source: HF ``_compute_llama3_parameters``.
  """
  _check_positive(factor, "factor")
  _check_positive(low_freq_factor, "low_freq_factor")
  _check_positive(high_freq_factor, "high_freq_factor")
  _check_positive(original_max_position_embeddings, "original_max_position_embeddings")
  if high_freq_factor == low_freq_factor:
    raise ValueError("llama3 scaling needs high_freq_factor != low_freq_factor, both are "
                     f"{low_freq_factor}")
  inv = jnp.asarray(inv, jnp.float32)
  low_freq_wavelen = original_max_position_embeddings / low_freq_factor
  high_freq_wavelen = original_max_position_embeddings / high_freq_factor
  wavelen = (2 * math.pi) / inv
  scaled = jnp.where(wavelen > low_freq_wavelen, inv / factor, inv)
  smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
      high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = jnp.logical_not(wavelen < high_freq_wavelen) & jnp.logical_not(wavelen > low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_init(dim: int, theta: float, rope_scaling: Mapping[str, Any] | None = None,
              max_position_embeddings: int | None = None,
              seq_len: int | None = None) -> tuple[jax.Array, float]:
  """Spectrum and attention factor from an HF-style ``rope_scaling`` dict (``ROPE_INIT_FUNCTIONS``).

  Supported ``rope_type`` (or legacy ``type``): ``default`` (also ``mrope``), ``linear``,
  ``dynamic``, ``yarn``, ``llama3``. Extra keys such as ``mrope_section`` are ignored.

  Args:
    dim: rotary width (``int(head_dim * partial_rotary_factor)``).
    theta: ``rope_theta``.
    rope_scaling: the config's dict, or None for default RoPE.
    max_position_embeddings: the config's value; needed by ``dynamic`` and as ``yarn``'s fallback
      for ``original_max_position_embeddings``.
    seq_len: static current length for ``dynamic``.
  Returns:
    ``(inv [dim/2] float32, attention_factor: float)``.
  Raises:
    ValueError: unknown rope type or a missing key that the rule needs.
  Source: HF ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``.
  """
  cfg = dict(rope_scaling or {})
  rope_type = cfg.get("rope_type", cfg.get("type", "default"))
  inv = inverse_frequencies(dim, theta)

  def need(key):
    value = cfg.get(key)
    if value is None:
      raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}; got keys {sorted(cfg)}")
    return value

  if rope_type in ("default", "mrope"):
    return inv, 1.0
  if rope_type == "linear":
    return linear_scaling(inv, need("factor")), 1.0
  if rope_type == "dynamic":
    if max_position_embeddings is None:
      raise ValueError("dynamic NTK scaling needs max_position_embeddings (the config's value)")
    return ntk_scaling(dim, theta, need("factor"), max_position_embeddings, seq_len), 1.0
  if rope_type == "yarn":
    original = cfg.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
      raise ValueError("yarn needs rope_scaling['original_max_position_embeddings'] or "
                       "max_position_embeddings")
    return yarn_scaling(inv, dim, theta, need("factor"), original,
                        cfg.get("beta_fast") or 32.0, cfg.get("beta_slow") or 1.0,
                        attention_factor=cfg.get("attention_factor"), mscale=cfg.get("mscale"),
                        mscale_all_dim=cfg.get("mscale_all_dim"),
                        truncate=cfg.get("truncate", True))
  if rope_type == "llama3":
    return llama3_scaling(inv, need("factor"), need("low_freq_factor"), need("high_freq_factor"),
                          need("original_max_position_embeddings")), 1.0
  raise ValueError(f"unsupported rope_type {rope_type!r}; use one of default, mrope, linear, "
                   "dynamic, yarn, llama3")


# ----------------------------------------------------------------------------------------------
# Assignments: spectrum -> Omega [A, n]
# ----------------------------------------------------------------------------------------------

def _check_spectrum(inv):
  inv = jnp.asarray(inv, jnp.float32)
  if inv.ndim != 1 or inv.shape[0] == 0:
    raise ValueError(f"spectrum must be a non-empty 1-D array [n], got shape {inv.shape}")
  return inv


def _from_owner(inv, owner, num_axes):
  """Omega[a, j] = inv[j] if owner[j] == a else 0."""
  mask = np.arange(num_axes)[:, None] == np.asarray(owner)[None, :]
  return jnp.where(jnp.asarray(mask), inv[None, :], jnp.float32(0))


def one_axis(inv: jax.Array) -> jax.Array:
  """1-D text RoPE: every plane turns with the single position axis.

  Args:
    inv: ``[n]`` float32 spectrum.
  Returns:
    Omega ``[1, n]`` float32.
  Source: HF ``Qwen3RotaryEmbedding``.
  """
  return _check_spectrum(inv)[None, :]


def axial(inv: jax.Array, num_axes: int = 2) -> jax.Array:
  """Axial RoPE (the Qwen ViT's 2-D RoPE for ``num_axes=2``): contiguous block ``a`` of planes
  turns with axis ``a``, each block using the same spectrum ``inv``.

  For the Qwen3-VL / Qwen2.5-VL ViT with head dim ``hdv``: ``inv = inverse_frequencies(hdv/2,
  theta)`` (``hdv/4`` values, exponent denominator ``hdv/2``), axes (row, col); planes
  ``0 .. hdv/4-1`` follow the row and ``hdv/4 .. hdv/2-1`` the column, which with rotate-half pairing
  rotates dims ``[0, hdv/4) U [hdv/2, 3hdv/4)`` by row and the others by column.

  Args:
    inv: ``[m]`` float32 per-axis spectrum.
    num_axes: number of position axes ``A`` (>= 1).
  Returns:
    Omega ``[A, A*m]`` float32 (block diagonal).
  Raises:
    ValueError: ``num_axes < 1`` or a bad spectrum.
  Source: qwen3vl_spec.md 3.3; HF ``Qwen3VLVisionRotaryEmbedding`` and ``rot_pos_emb`` (table
  ``arange x inv`` gathered at (row, col) and flattened, i.e. ``concat(row*inv, col*inv)``).
  """
  inv = _check_spectrum(inv)
  if not isinstance(num_axes, (int, np.integer)) or num_axes < 1:
    raise ValueError(f"num_axes must be a positive int, got {num_axes!r}")
  owner = np.repeat(np.arange(num_axes), inv.shape[0])
  return _from_owner(jnp.tile(inv, num_axes), owner, num_axes)


def _check_section(section, n):
  section = [int(s) for s in section]
  if not section or any(s < 0 for s in section):
    raise ValueError(f"section must be a non-empty list of non-negative ints, got {section}")
  if sum(section) != n:
    raise ValueError(f"section {section} sums to {sum(section)} but the spectrum has {n} planes "
                     "(head_dim/2); fix mrope_section or head_dim")
  return section


def section_owner(n: int, section: Sequence[int]) -> np.ndarray:
  """Host ``[n]`` int array: axis owning each plane under contiguous sections (Qwen2/2.5-VL)."""
  section = _check_section(section, n)
  return np.repeat(np.arange(len(section)), section)


def interleaved_owner(n: int, section: Sequence[int]) -> np.ndarray:
  """Host ``[n]`` int array: axis owning each plane under Qwen3-VL's interleaved MRoPE.

  With ``k = len(section)`` axes, axis ``a >= 1`` owns planes ``j`` with ``j % k == a`` and
  ``j < k * section[a]``; axis 0 owns the rest. For ``[24, 20, 20]`` and ``n = 64``:
  ``THW THW ... THW (20x) TTTT``.

  Raises:
    ValueError: when the rule does not give axis ``a`` exactly ``section[a]`` planes (some
      ``section[a]`` too large for the interleaved range) or the sections do not sum to ``n``.
  """
  section = _check_section(section, n)
  k = len(section)
  owner = np.zeros(n, np.int32)
  for a in range(1, k):
    owner[a:min(k * section[a], n):k] = a
  counts = np.bincount(owner, minlength=k).tolist()
  if counts != section:
    raise ValueError(f"interleaved MRoPE with section {section} over {n} planes gives axis plane "
                     f"counts {counts}; each section[a] for a >= 1 must satisfy "
                     f"a + {k}*(section[a]-1) < {n}")
  return owner


def sections(inv: jax.Array, section: Sequence[int]) -> jax.Array:
  """Sectioned MRoPE (Qwen2-VL / Qwen2.5-VL): contiguous blocks of planes per axis.

  Axis ``a`` owns planes ``[sum(section[:a]), sum(section[:a+1]))``, each keeping its own
  frequency. (HF splits the duplicated cos/sin into ``section * 2`` chunks and takes chunk ``i`` from
  row ``i % 3``, the same assignment applied to both halves.)

  Args:
    inv: ``[n]`` float32 spectrum.
    section: e.g. ``[16, 24, 24]`` (``mrope_section``), summing to ``n``.
  Returns:
    Omega ``[len(section), n]`` float32.
  Raises:
    ValueError: section does not sum to ``n``.
  Source: qwen3vl_spec.md 6.3; HF ``apply_multimodal_rotary_pos_emb``.
  """
  inv = _check_spectrum(inv)
  return _from_owner(inv, section_owner(inv.shape[0], section), len(section))


def interleaved(inv: jax.Array, section: Sequence[int]) -> jax.Array:
  """Interleaved MRoPE (Qwen3-VL): axes take turns across the whole spectrum.

  See :func:`interleaved_owner` for the rule; each plane keeps its own frequency, only the position
  axis driving it changes.

  Args:
    inv: ``[n]`` float32 spectrum.
    section: e.g. ``[24, 20, 20]`` (``mrope_section``), summing to ``n``.
  Returns:
    Omega ``[len(section), n]`` float32.
  Raises:
    ValueError: see :func:`interleaved_owner`.
  Source: qwen3vl_spec.md 6.2; HF ``Qwen3VLTextRotaryEmbedding.apply_interleaved_mrope``.
  """
  inv = _check_spectrum(inv)
  return _from_owner(inv, interleaved_owner(inv.shape[0], section), len(section))


# ----------------------------------------------------------------------------------------------
# Application
# ----------------------------------------------------------------------------------------------

def angles(positions: jax.Array, omega: jax.Array) -> jax.Array:
  """Rotation angles ``sum_a positions[a] * Omega[a]``.

  Each term is one float32 product and the other axes contribute exact zeros, so for one-hot
  assignments this is bit-identical to gathering the owning axis's ``position * inv`` as HF does.

  Args:
    positions: ``[A, ..., L]`` int or float (cast to float32; integers below 2^24 are exact).
    omega: ``[A, n]`` float32.
  Returns:
    ``[..., L, n]`` float32.
  Raises:
    ValueError: rank or axis-count mismatch.
  Source: architecture.md RoPE section; qwen3vl_spec.md 6.1/6.5.
  """
  positions = jnp.asarray(positions)
  omega = jnp.asarray(omega, jnp.float32)
  if omega.ndim != 2:
    raise ValueError(f"Omega must be [num_axes, n], got shape {omega.shape}")
  if positions.ndim < 2 or positions.shape[0] != omega.shape[0]:
    raise ValueError(f"positions must be [num_axes={omega.shape[0]}, ..., L], got shape "
                     f"{positions.shape}; add a leading axis for 1-D positions")
  p = positions.astype(jnp.float32)[..., None]
  w = omega.reshape((omega.shape[0],) + (1,) * (positions.ndim - 1) + (omega.shape[1],))
  return jnp.sum(p * w, axis=0)


def _check_pairing(pairing):
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")


def cos_sin(theta: jax.Array, attention_factor: float = 1.0, dtype: Any = jnp.float32,
            pairing: str = "half") -> tuple[jax.Array, jax.Array]:
  """cos and sin of the angles, expanded to the rotary width and scaled by the attention factor.

  ``pairing="half"``: ``phi = concat(theta, theta)`` (HF ``torch.cat((freqs, freqs))``);
  ``pairing="interleaved"``: each angle repeated twice in place (GPT-J style adjacent pairs).
  cos/sin are computed in float32, multiplied by ``attention_factor``, then cast to ``dtype`` (HF
  casts text cos/sin to the model dtype, spec 6.4).

  Args:
    theta: ``[..., L, n]`` angles (float32).
    attention_factor: multiplier on cos and sin (YaRN's; 1.0 otherwise).
    dtype: output dtype.
    pairing: "half" or "interleaved".
  Returns:
    ``(cos, sin)``, each ``[..., L, 2n]`` of ``dtype``.
  Raises:
    ValueError: unknown pairing.
  """
  _check_pairing(pairing)
  theta = jnp.asarray(theta, jnp.float32)
  if pairing == "half":
    phi = jnp.concatenate([theta, theta], axis=-1)
  else:
    phi = jnp.repeat(theta, 2, axis=-1)
  cos = jnp.cos(phi) * jnp.float32(attention_factor)
  sin = jnp.sin(phi) * jnp.float32(attention_factor)
  return cos.astype(dtype), sin.astype(dtype)


def _rotate_pairs(x, pairing):
  if pairing == "half":
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, pairing: str = "half",
                 compute_dtype: Any = jnp.float32) -> jax.Array:
  """``x * cos + rot(x) * sin`` on the first ``R`` features, the rest passed through.

  ``rot`` is HF's ``rotate_half`` (``[a, b] -> [-b, a]`` on the two halves, pairs ``(k, k + R/2)``)
  for ``pairing="half"``, or the adjacent-pair version ``(x0, x1) -> (-x1, x0)`` for "interleaved".
  Computed in ``compute_dtype`` (float32 matches the HF vision path; pass the model dtype with
  cos/sin in that dtype to reproduce HF's bf16 text path, spec 11 item 5) and cast back to
  ``x.dtype``.

  Args:
    x: ``[..., L, H, D]`` queries or keys.
    cos, sin: ``[..., L, R]`` (from :func:`cos_sin`), leading axes broadcastable against ``x``'s;
      ``R`` even and ``<= D``.
    pairing: "half" or "interleaved".
    compute_dtype: dtype of the products and sums.
  Returns:
    ``[..., L, H, D]`` of ``x.dtype``.
  Raises:
    ValueError: unknown pairing, rank mismatch, ``R`` odd or larger than ``D``.
  Source: HF ``apply_rotary_pos_emb`` / ``apply_rotary_pos_emb_vision`` / ``rotate_half``.
  """
  _check_pairing(pairing)
  x = jnp.asarray(x)
  if cos.shape != sin.shape:
    raise ValueError(f"cos {cos.shape} and sin {sin.shape} must have the same shape")
  if x.ndim < 3 or cos.ndim < 2:
    raise ValueError(f"x must be [..., L, H, D] and cos/sin [..., L, R], got {x.shape} and "
                     f"{cos.shape}")
  rot = cos.shape[-1]
  if rot % 2 or rot > x.shape[-1]:
    raise ValueError(f"rotary width {rot} must be even and <= head dim {x.shape[-1]}")
  if cos.shape[-2] != x.shape[-3] and cos.shape[-2] != 1:
    raise ValueError(f"cos/sin length {cos.shape[-2]} does not match x's length axis "
                     f"{x.shape[-3]} (x is [..., L, H, D], cos/sin [..., L, R])")
  cos = cos[..., None, :].astype(compute_dtype)
  sin = sin[..., None, :].astype(compute_dtype)
  x_rot = x[..., :rot].astype(compute_dtype)
  out = (x_rot * cos + _rotate_pairs(x_rot, pairing) * sin).astype(x.dtype)
  if rot < x.shape[-1]:
    out = jnp.concatenate([out, x[..., rot:]], axis=-1)
  return out


def rotate(x: jax.Array, theta: jax.Array, pairing: str = "half", attention_factor: float = 1.0,
           compute_dtype: Any = jnp.float32) -> jax.Array:
  """Rotate queries or keys by angles: ``apply_rotary(x, *cos_sin(theta, ...))``.

  Args:
    x: ``[..., L, H, D]``.
    theta: ``[..., L, n]`` float32 angles from :func:`angles`; ``R = 2n <= D`` features rotate
      (partial rotary when ``R < D``).
    pairing: "half" (Qwen family, HF ``rotate_half``) or "interleaved".
    attention_factor: cos/sin multiplier (YaRN).
    compute_dtype: dtype of cos/sin and of the rotation arithmetic (float32 default).
  Returns:
    ``[..., L, H, D]`` of ``x.dtype``.
  Raises:
    ValueError: see :func:`apply_rotary`.
  """
  cos, sin = cos_sin(theta, attention_factor, compute_dtype, pairing)
  return apply_rotary(x, cos, sin, pairing, compute_dtype)


# ----------------------------------------------------------------------------------------------
# One-line compositions
# ----------------------------------------------------------------------------------------------

def text_rope(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """1-D RoPE angles (Qwen3 text, default rope type).

  Args:
    positions: ``[..., L]`` int positions.
    head_dim: ``D`` (even).
    theta: ``rope_theta``.
  Returns:
    ``[..., L, D/2]`` float32 angles for :func:`rotate`.
  Source: HF ``Qwen3RotaryEmbedding``.
  """
  return angles(jnp.asarray(positions)[None], one_axis(inverse_frequencies(head_dim, theta)))


def mrope(positions: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int],
          interleaved: bool) -> jax.Array:  # pylint: disable=redefined-outer-name
  """Multimodal RoPE angles from (t, h, w) positions.

  Args:
    positions: ``[3, ..., L]`` int (rows T, H, W; e.g. ``[3, B, L]`` from ``get_rope_index``).
      For text-only input broadcast one row to all three (the result then equals
      :func:`text_rope`).
    head_dim: ``D``; ``sum(mrope_section)`` must be ``D/2``.
    theta: ``rope_theta``.
    mrope_section: e.g. ``[24, 20, 20]`` (Qwen3-VL) or ``[16, 24, 24]`` (Qwen2.5-VL).
    interleaved: True for Qwen3-VL's interleaved layout, False for Qwen2/2.5-VL's sections.
  Returns:
    ``[..., L, D/2]`` float32 angles.
  Raises:
    ValueError: section/head_dim mismatch, wrong leading axis.
  Source: qwen3vl_spec.md 6.2-6.3.
  """
  inv = inverse_frequencies(head_dim, theta)
  rule = interleaved_owner if interleaved else section_owner
  omega = _from_owner(inv, rule(inv.shape[0], mrope_section), len(mrope_section))
  return angles(positions, omega)


def vision_rope(hw_positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Qwen3-VL / Qwen2.5-VL ViT 2-D RoPE angles from (row, col) patch coordinates.

  Args:
    hw_positions: ``[2, ..., N]`` int (row, col) in the patch grid, tokens in merge-window order
      (spec 3.3).
    head_dim: ViT head dim ``hdv`` (divisible by 4).
    theta: base (10000 in every released config).
  Returns:
    ``[..., N, hdv/2]`` float32: ``concat(row * inv, col * inv)`` with
    ``inv = inverse_frequencies(hdv/2, theta)``.
  Raises:
    ValueError: ``head_dim`` not divisible by 4.
  Source: qwen3vl_spec.md 3.3; HF ``Qwen3VLVisionRotaryEmbedding`` / ``rot_pos_emb``.
  """
  if head_dim % 4:
    raise ValueError(f"vision head_dim must be divisible by 4 (two axes x rotate-half), got "
                     f"{head_dim}")
  return angles(hw_positions, axial(inverse_frequencies(head_dim // 2, theta), 2))
