"""Qwen3 text decoder (dense and MoE) and the Qwen2/Qwen2.5 decoder, in Flax linen.

One implementation covers three HF families, selected by :class:`Qwen3TextConfig`:

* Qwen3 dense (HF ``Qwen3Model``; Qwen3-VL ``Qwen3VLTextModel``): q/k RMSNorm over ``head_dim``,
  no biases.
* Qwen3-MoE (HF ``Qwen3MoeModel``; Qwen3-VL-MoE ``Qwen3VLMoeTextModel``): as Qwen3, with a sparse
  MoE block in the layers that ``Qwen3TextConfig.is_sparse_layer`` selects.
* Qwen2 / Qwen2.5 (HF ``Qwen2Model``; Qwen2.5-VL text): bias on q/k/v (not o), no q/k norm.

Math: /work/shared/design/qwen3vl_spec.md sections 5 (layer, MoE, head), 6.4 (rotary application),
8 (DeepStack injection), 11 (numerics). Parameter names mirror the HF checkpoint keys
(spec section 10): ``embed_tokens/embedding``, ``layers_{i}/{input_layernorm, self_attn/{q_proj,
k_proj, v_proj, o_proj, q_norm, k_norm}, post_attention_layernorm, mlp/{gate_proj, up_proj,
down_proj} | mlp/{gate, experts/{gate_up_proj, down_proj}}}``, ``norm``; ``lm_head`` in
:class:`Qwen3LM`. With ``scan_layers=True`` the ``layers_{i}`` subtrees are replaced by one
``layers`` subtree whose leaves carry a leading ``LAYERS`` axis (see :func:`stack_layers`,
:func:`unstack_layers`).

Rotary embedding: the decoder takes precomputed rotary angles ``[B, L, head_dim/2]`` float32
(``theta[b, s, j] = position[b, s] * inv_freq[j]``, with the MRoPE axis selection already applied;
see ``vlm.nn.rope``), so the same decoder serves 1-D RoPE and both MRoPE layouts. The rotation is
``vlm.nn.rope.rotate`` (the library's, no private copy): cos/sin are taken in float32 and cast to
the compute dtype before the NeoX rotate-half rotation, which runs in the compute dtype (spec 6.4 /
pitfall 5).

Context parallelism (training, long rows): the token axis of the activations carries the logical
name ``SEQUENCE``, which ``vlm.parallel.mesh.DEFAULT_RULES`` map to the ``context`` mesh axis;
under a mesh with ``context > 1`` (``jax.set_mesh`` + ``nn.logical_axis_rules``) every projection,
norm, MLP and the DeepStack addition run on the local tokens, and attention keeps its queries
local while all-gathering keys/values (:func:`vlm.nn.attention.attention` with ``sharded=True``;
any ``attention_implementation``, the segment-id form of the mask, causal by global position).

Packing (training): ``Qwen3Model(..., segment_ids=[B, L])`` confines causal attention to tokens
of equal segment id (1..S per packed sample, 0 = padding, which attends only to padding); each
segment carries its own (restarting) positions in the angles. ``return_hidden=True`` on the LMs
returns the final normed hidden states so a loss can take the logits in chunks
(:func:`lm_head_kernel`). MoE layers sow their router logits (pre-softmax, float32 [B*L, E], HF
``output_router_logits``) as ``("intermediates", ..., "router_logits")``; read them with
:func:`router_logits` (both layer layouts).

float16 (``dtype=jnp.float16``; decision per path, see ``vlm.nn.layers``): computed safely, not
refused. Attention scores are float32 in both the uncached (``vlm.nn.attention``) and the cached
path (:func:`vlm.nn.attention.cached_attention`), and both value products accumulate in float32. The residual
stream ``h`` is float32 (:func:`vlm.nn.layers.residual_dtype`); ``o_proj`` and the MLP
``down_proj`` return float32 into it (``Dense(wide_float16=True)``), the SwiGLU gate/up products
and ``act(gate) * up`` are float32 and the down product's input rows are pre-scaled into float16
range (the MoE experts likewise, ``vlm.nn.moe``). So the overflows seen with float16 Qwen2/Qwen2.5
checkpoints (scores, SwiGLU intermediates, residual channels beyond 65,504) stay finite, while the
matmuls themselves still run float16 x float16. The KV cache stores post-RoPE keys/values in its
own dtype. bfloat16 and float32 compute exactly what they did before.

Known numerical difference from HF in bfloat16: ``vlm.nn.layers.RMSNorm`` multiplies by the weight
in float32 and rounds once, HF rounds the normalised value to bf16 first and multiplies by the bf16
weight (spec pitfall 6); about 1 ulp. Float32 is unaffected.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.nn import layers
from vlm.nn import moe
from vlm.nn import partitioning as P
from vlm.nn import rope
from vlm.nn.attention import (IMPLEMENTATIONS, attention, cache_masks, cached_attention,
                              causal_padding_mask, context_parallel_size, dot_product_attention,
                              init_kv_cache)

Dtype = Any

_QWEN2_MODEL_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class Qwen3TextConfig:
  """Text decoder configuration with HF ``Qwen3Config``/``Qwen3MoeConfig``/``Qwen2Config`` names.

  Attributes beyond HF's:
    use_qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE (True for Qwen3,
      False for Qwen2/Qwen2.5).
    o_proj_bias: bias on ``o_proj``; None means "same as ``attention_bias``" (HF Qwen3 puts
      ``attention_bias`` on all four projections; Qwen2 has q/k/v bias and no o bias, i.e.
      ``attention_bias=True, o_proj_bias=False``).
    mrope_section / mrope_interleaved: how the composed VL model builds the rotary angles
      (spec section 6); the decoder itself only consumes angles.
    moe_implementation: how MoE layers evaluate their experts (never read from an HF config):
      ``"dense"`` runs every expert on every token (HF's eval path; shards over the ``expert``
      mesh axis; the faster one on CPU and GPU with jax <= 0.11), ``"routed"`` is expert
      parallelism (tokens sent to their experts' devices over the ``expert`` mesh axis and back,
      ``vlm.nn.moe.routed_expert_mlp``; the one to use with ``expert`` > 1), ``"ragged"``
      routes each token to its k experts only (dropless,
      ``jax.lax.ragged_dot``; k/E of the FLOPs where ragged_dot lowers to a grouped matmul,
      e.g. TPU), ``"gather"`` gathers each token's k expert matrices (T*k expert reads instead
      of E: decode steps), ``"auto"`` (default) is "gather" when a call has ``B*L*k < E``
      tokens x experts and "dense" otherwise. Same result up to float summation order; timings
      in ``vlm.nn.moe``.
  MoE: ``num_experts > 0`` makes layer ``i`` sparse when ``i not in mlp_only_layers`` and
  ``(i + 1) % decoder_sparse_step == 0`` (HF ``Qwen3MoeDecoderLayer``); sparse layers use
  ``moe_intermediate_size``, dense layers ``intermediate_size``. ``norm_topk_prob`` renormalises
  the top-k router probabilities (Qwen3-VL-MoE in 4.57.1 always does; set it True there).
  ``attention_implementation`` (vlm setting, not read from HF configs): ``"xla"`` (dense mask,
  default), ``"chunked"`` (blockwise online softmax, O(L x block) memory forward and backward),
  ``"splash"`` (TPU), ``"cudnn"`` (GPU) or ``"auto"`` (:func:`vlm.nn.attention.attention`);
  ``attention_block_size`` its block. The cached (generation) path always uses the dense form.
  ``router_aux_loss_coef`` weighs the load-balancing loss in training (HF's field, default 0.001;
  used by :func:`vlm.tasks.qwen_vl.loss_fn`, not by the forward pass).
  Raises:
    ValueError: inconsistent head counts, widths, MoE settings or an unknown activation.
  """
  vocab_size: int = 151936
  hidden_size: int = 4096
  intermediate_size: int = 22016
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  o_proj_bias: bool | None = None
  use_qk_norm: bool = True
  attention_dropout: float = 0.0
  num_experts: int = 0
  num_experts_per_tok: int = 8
  moe_intermediate_size: int = 768
  norm_topk_prob: bool = True
  router_aux_loss_coef: float = 0.001
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  mrope_section: tuple[int, ...] | None = None
  mrope_interleaved: bool = False
  moe_implementation: str = "auto"
  attention_implementation: str = "xla"
  attention_block_size: int = 512

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    for name in ("rope_theta", "rms_norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
    if self.num_experts and self.moe_intermediate_size < 1:
      raise ValueError(f"moe_intermediate_size must be >= 1 with num_experts > 0, got "
                       f"{self.moe_intermediate_size}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                         f"{self.num_attention_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    layers.activation(self.hidden_act)
    object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    if self.mrope_section is not None:
      object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if self.num_experts < 0:
      raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                       f"got {self.num_experts_per_tok}")
    if self.decoder_sparse_step < 1:
      raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
    if self.attention_implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention_implementation must be one of {IMPLEMENTATIONS}, got "
                       f"{self.attention_implementation!r}")
    if self.attention_block_size < 1:
      raise ValueError(f"attention_block_size must be >= 1, got {self.attention_block_size}")
    if self.moe_implementation not in ("auto", "dense", "ragged", "gather", "routed"):
      raise ValueError(f"moe_implementation must be 'auto', 'dense', 'ragged', 'gather' or "
                       f"'routed', got "
                       f"{self.moe_implementation!r}")

  @property
  def use_o_proj_bias(self) -> bool:
    return self.attention_bias if self.o_proj_bias is None else self.o_proj_bias

  def is_sparse_layer(self, layer_idx: int) -> bool:
    """Whether decoder layer ``layer_idx`` uses the MoE block (HF ``Qwen3MoeDecoderLayer`` rule)."""
    return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0)

  @property
  def homogeneous(self) -> bool:
    """True when every layer has the same kind of MLP (required by ``scan_layers``)."""
    kinds = {self.is_sparse_layer(i) for i in range(self.num_hidden_layers)}
    return len(kinds) <= 1

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen3TextConfig":
    """Builds a config from an HF text config dict (``PretrainedConfig.to_dict()``).

    ``model_type`` in ``qwen2*`` gives the Qwen2 attention (q/k/v bias, no o bias, no q/k norm);
    anything else is read as Qwen3/Qwen3-MoE. Unknown keys are ignored; ``rope_scaling``'s (or
    transformers 5's ``rope_parameters``') ``mrope_section``/``mrope_interleaved`` (and
    ``rope_theta``) are copied when present.

    Raises:
      ValueError: a scaled rope type (e.g. ``yarn``, ``linear``), which these decoders do not
        apply; or invalid sizes (see the class).
    """
    d = dict(d)
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
          if f.name in d and f.name not in _VLM_ONLY}  # vlm-only settings: keep defaults
    if d.get("model_type", "") in _QWEN2_MODEL_TYPES:
      kw.update(attention_bias=True, o_proj_bias=False, use_qk_norm=False)
    # transformers 4.x: ``rope_scaling`` + top-level ``rope_theta``; 5.x: ``rope_parameters``
    # holding both (spec section 12). Either spelling is read.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if "rope_theta" not in d and rope.get("rope_theta") is not None:
      kw["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default", "mrope"):
      raise ValueError(f"rope type {kind!r} (rope_scaling / rope_parameters) is not supported: "
                       "vlm's Qwen decoders use unscaled (M)RoPE as the released checkpoints do")
    if "mrope_section" in rope:
      kw["mrope_section"] = tuple(rope["mrope_section"])
      kw.setdefault("mrope_interleaved", bool(rope.get("mrope_interleaved", False)))
    if kw.get("mlp_only_layers") is None:
      kw.pop("mlp_only_layers", None)
    if kw.get("num_experts") is None:
      kw.pop("num_experts", None)
    return cls(**kw)


# ------------------------------------------------------------------------------------------------
# Masks (the rotation itself is ``vlm.nn.rope.rotate``).


# Fields of Qwen3TextConfig that are vlm settings, not part of an HF config.json.
_VLM_ONLY = ("moe_implementation", "attention_implementation", "attention_block_size")


def _attention_segments(attention_mask, segment_ids):
  """int32 [B, L] segment ids for :func:`vlm.nn.attention.attention` (the kernels' form of the
  mask :func:`_build_mask` builds): ``segment_ids`` where ``attention_mask`` is set, else 0;
  without packing the real tokens form segment 1. Real tokens see exactly the keys of the dense
  mask; padding sees padding."""
  seg = jnp.ones_like(attention_mask, jnp.int32) if segment_ids is None else segment_ids
  return jnp.where(attention_mask, seg, 0).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# Blocks.


class Qwen3Attention(nn.Module):
  """GQA self-attention with optional q/k RMSNorm and a fixed-size KV cache (spec 5.1).

  Call args:
    x: [B, L, D] (compute dtype).
    angles: float32 [B, L, hd/2] rotary angles of the new tokens.
    mask: without cache, bool broadcastable to [B, 1, L, L]; with a cache, the pair
      ``(mask_cache [B, 1, 1, T], mask_new [B, 1, L, L])`` of :func:`_build_cache_masks`.
    cache: None or ``(k, v)`` each [B, kvH, T, hd], this layer's cache *before* the call
      (post-RoPE keys, HF cache semantics). It is only read (:func:`vlm.nn.attention.cached_attention`).
    cache_index: unused here (the masks encode it); kept for the scan signature.
    deterministic: disables attention dropout (``config.attention_dropout``, rng "dropout");
      the cached path is for inference and never drops.
  Returns:
    (out [B, L, D] in ``dtype`` (float32 for float16 compute: the residual dtype), None without
    cache or ``(k_new, v_new)`` each [B, L, kvH, hd] with one).
  """
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, angles, mask, cache=None, cache_index=None, deterministic: bool = True):
    cfg = self.config
    batch, length, _ = x.shape
    h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda n, f, bias, axes, wide=False: layers.Dense(
        f, kernel_axes=axes, use_bias=bias, name=n, wide_float16=wide, **kw)
    q = dense("q_proj", h * hd, cfg.attention_bias, (P.EMBED, P.HEADS))(x)
    k = dense("k_proj", kvh * hd, cfg.attention_bias, (P.EMBED, P.HEADS))(x)
    v = dense("v_proj", kvh * hd, cfg.attention_bias, (P.EMBED, P.HEADS))(x)
    q = q.reshape(batch, length, h, hd)
    k = k.reshape(batch, length, kvh, hd)
    v = v.reshape(batch, length, kvh, hd)
    if cfg.use_qk_norm:
      q = layers.RMSNorm(cfg.rms_norm_eps, axis_name=P.KV, name="q_norm", **kw)(q)
      k = layers.RMSNorm(cfg.rms_norm_eps, axis_name=P.KV, name="k_norm", **kw)(k)
    # NeoX rotate-half RoPE in the compute dtype, cos/sin taken in float32 then cast (spec 6.4)
    q = rope.rotate(jnp.asarray(q, self.dtype), angles, compute_dtype=self.dtype)
    k = rope.rotate(jnp.asarray(k, self.dtype), angles, compute_dtype=self.dtype)
    v = jnp.asarray(v, self.dtype)
    if cache is not None:
      # decode / prefill into a cache: read the old slots, return only the new keys and values
      # (Qwen3Model writes them into the stacked cache once, after all layers)
      ck, cv = cache
      mask_cache, mask_new = mask
      o = cached_attention(q, k, v, ck, cv, mask_cache, mask_new, hd ** -0.5, self.dtype)
      o = o.reshape(batch, length, h * hd)
      out = dense("o_proj", cfg.hidden_size, cfg.use_o_proj_bias, (P.HEADS, P.EMBED), True)(o)
      return out, (k, v)
    if mask.ndim == 2:  # int32 [B, L] segment ids (Qwen3Model: non-xla or context parallel)
      use_dropout = not deterministic and cfg.attention_dropout > 0.0
      # sharded: under a mesh, shard_map over rows/heads and context parallelism over the
      # SEQUENCE axis (keys/values all-gathered); the plain call without a mesh
      o = attention(q, k, v, segment_ids=mask, causal=True, scale=hd ** -0.5,
                    implementation=cfg.attention_implementation,
                    block_size=cfg.attention_block_size, dtype=self.dtype,
                    dropout_rate=cfg.attention_dropout if use_dropout else 0.0,
                    dropout_rng=self.make_rng("dropout") if use_dropout else None,
                    deterministic=not use_dropout, sharded=True)
      o = o.reshape(batch, length, h * hd)
      out = dense("o_proj", cfg.hidden_size, cfg.use_o_proj_bias, (P.HEADS, P.EMBED), True)(o)
      return out, None
    rep = h // kvh
    if rep > 1:  # query head j reads kv head j // rep (HF repeat_kv)
      k = jnp.repeat(k, rep, axis=2)
      v = jnp.repeat(v, rep, axis=2)
    use_dropout = not deterministic and cfg.attention_dropout > 0.0
    o = dot_product_attention(
        q, k, v, mask=mask, scale=hd ** -0.5, dropout_rate=cfg.attention_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=not use_dropout, dtype=self.dtype)
    o = o.reshape(batch, length, h * hd)
    out = dense("o_proj", cfg.hidden_size, cfg.use_o_proj_bias, (P.HEADS, P.EMBED), True)(o)
    return out, None


class Qwen3MLP(nn.Module):
  """SwiGLU MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``, no biases. [B,L,D] -> [B,L,D].

  In ``dtype``; for float16 compute gate, up, their product and the result are float32 (wide
  Dense; see the module docstring), so an intermediate above 65,504 stays finite.
  """
  config: Qwen3TextConfig
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, wide_float16=True)
    act = layers.activation(self.config.hidden_act)
    g = layers.Dense(self.intermediate_size, kernel_axes=(P.EMBED, P.MLP), name="gate_proj", **kw)(x)
    u = layers.Dense(self.intermediate_size, kernel_axes=(P.EMBED, P.MLP), name="up_proj", **kw)(x)
    return layers.Dense(self.config.hidden_size, kernel_axes=(P.MLP, P.EMBED), name="down_proj",
                        **kw)(act(g) * u)


class Qwen3MoeExperts(nn.Module):
  """Fused expert weights ``gate_up_proj`` [E, D, 2I] and ``down_proj`` [E, I, D] ([in, out]).

  Layout of HF ``Qwen3VLMoeTextExperts`` (spec 10.2): columns ``[:I]`` of ``gate_up_proj`` are the
  gate, ``[I:]`` the up projection. HF ``Qwen3MoeSparseMoeBlock`` keeps a ModuleList of
  ``Qwen3MoeMLP``; converting it means ``gate_up_proj[e] = concat(gate_proj.weight.T,
  up_proj.weight.T, -1)``, ``down_proj[e] = down_proj.weight.T``.

  ``config.moe_implementation`` picks the evaluation (same parameters either way):
  ``"dense"`` (:func:`vlm.nn.moe.dense_expert_mlp`): every expert runs on every token, mixed by
  the top-k weights scattered to [T, E]; exact, shards over the ``expert`` mesh axis, but costs
  E/k times the routed FLOPs and a [T, E, 2I] intermediate (HF's eval path does the same).
  ``"ragged"`` (:func:`vlm.nn.moe.ragged_expert_mlp`): dropless routing, each token through its
  k experts with ``jax.lax.ragged_dot``; equal up to float summation order.
  ``"gather"`` (:func:`vlm.nn.moe.gather_expert_mlp`): each token's k expert matrices gathered
  (T*k expert reads instead of E: decode). ``"routed"`` (:func:`vlm.nn.moe.routed_expert_mlp`):
  expert parallelism, tokens dispatched to the devices of their experts (``expert`` mesh axis)
  with a ragged all-to-all and back. ``"auto"`` (default) picks "gather" when
  ``B * L * k < E``, else "dense" (:func:`vlm.nn.moe.choose_implementation`).

  Call args: x [B, L, D]; weights [B, L, k] routing weights (compute dtype); experts int [B, L, k]
  distinct expert ids per token. Returns [B, L, D] in the compute dtype (float32 for float16:
  ``vlm.nn.moe`` keeps float16 expert outputs wide).
  """
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, weights, experts):

    cfg = self.config
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nn.initializers.normal(stddev=0.02)
    gate_up = self.param("gate_up_proj", P.with_axes(init, (P.EXPERT, P.EMBED, P.MLP)),
                         (e, d, 2 * i), self.param_dtype)
    down = self.param("down_proj", P.with_axes(init, (P.EXPERT, P.MLP, P.EMBED)),
                      (e, i, d), self.param_dtype)
    b, l = x.shape[:2]
    k = experts.shape[-1]
    fn = moe.IMPLEMENTATIONS[moe.choose_implementation(cfg.moe_implementation, b * l, e, k)]
    out = fn(jnp.asarray(x, self.dtype).reshape(b * l, d), jnp.asarray(gate_up, self.dtype),
             jnp.asarray(down, self.dtype), experts.reshape(b * l, k),
             jnp.asarray(weights, self.dtype).reshape(b * l, k),
             layers.activation(cfg.hidden_act))
    return out.reshape(b, l, d)


class Qwen3SparseMoeBlock(nn.Module):
  """Router + experts (spec 5.2; HF ``Qwen3MoeSparseMoeBlock`` / ``Qwen3VLMoeTextSparseMoeBlock``).

  ``gate`` Linear D->E without bias (compute dtype); softmax over all E in float32; top-k;
  renormalise when ``norm_topk_prob``; cast to the compute dtype; experts evaluated densely or
  routed per ``config.moe_implementation`` (see :class:`Qwen3MoeExperts`).
  Call: x [B, L, D] -> [B, L, D]. Sows the gate logits, float32 [B*L, E] before the softmax (HF
  ``Qwen3VLMoeTextSparseMoeBlock``'s second output), into ``intermediates/.../router_logits``
  when that collection is mutable.
  """
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    logits = layers.Dense(cfg.num_experts, kernel_axes=(P.EMBED, None), use_bias=False,
                          name="gate", dtype=self.dtype, param_dtype=self.param_dtype,
                          wide_float16=True)(x)
    # for the load-balancing loss (HF ``output_router_logits``): pre-softmax, [B*L, E] float32;
    # a no-op unless "intermediates" is mutable in the apply
    self.sow("intermediates", "router_logits",
             jnp.asarray(logits, jnp.float32).reshape(-1, cfg.num_experts))
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
      top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    top_p = jnp.asarray(top_p, self.dtype)
    return Qwen3MoeExperts(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="experts")(x, top_p, top_i)


class Qwen3DecoderLayer(nn.Module):
  """Pre-norm decoder layer (spec 5.1) plus the DeepStack addition after it (spec 8).

  The call signature is that of an ``nn.scan`` body so the same module serves both layouts.

  Attributes:
    layer_idx: static index when unscanned; None under ``nn.scan`` (the index then comes from
      ``xs``). Decides dense vs MoE MLP (``config.is_sparse_layer``); under scan ``sparse`` does.
    sparse: MoE MLP (used when ``layer_idx`` is None).
  Call args:
    h: [B, L, D] residual stream (carry).
    xs: ``(index int32 [], cache_k [B,kvH,T,hd] | None, cache_v | None)``.
    angles, mask, cache_index, deterministic: see :class:`Qwen3Attention`.
    deepstack: None or [K, B, L, D]; ``deepstack[index]`` is added after this layer when
      ``index < K``, at positions where ``visual_mask`` [B, L] is True (everywhere when None).
  Returns:
    (h [B, L, D], (k_new, v_new) each [B, L, kvH, hd] with a cache, else (None, None)).
  """
  config: Qwen3TextConfig
  layer_idx: int | None = None
  sparse: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, xs, angles, mask, deepstack, visual_mask, cache_index,
               deterministic: bool = True):
    cfg = self.config
    index, ck, cv = xs
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cache = None if ck is None else (ck, cv)
    u = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(h)
    a, new_cache = Qwen3Attention(cfg, name="self_attn", **kw)(
        u, angles, mask, cache, cache_index, deterministic)
    h = h + a
    u = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
    sparse = self.sparse if self.layer_idx is None else cfg.is_sparse_layer(self.layer_idx)
    if sparse:
      m = Qwen3SparseMoeBlock(cfg, name="mlp", **kw)(u)
    else:
      m = Qwen3MLP(cfg, cfg.intermediate_size, name="mlp", **kw)(u)
    h = h + m
    if deepstack is not None:
      num = deepstack.shape[0]
      if self.layer_idx is not None:  # static: add only in the first K layers
        add = deepstack[self.layer_idx] if self.layer_idx < num else None
      else:
        add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(index, num - 1), 0, False)
        add = jnp.where(index < num, add, jnp.zeros_like(add))
      if add is not None:
        add = jnp.asarray(add, h.dtype)
        if visual_mask is not None:
          add = jnp.where(visual_mask[..., None], add, jnp.zeros_like(add))
        h = h + add
    h = P.constrain(h, (P.BATCH, P.SEQUENCE, P.EMBED))
    return h, (None, None) if new_cache is None else new_cache


# ------------------------------------------------------------------------------------------------
# Model.


def init_cache(config: Qwen3TextConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32):
  """Empty KV cache for :class:`Qwen3Model`.

  Returns a dict ``{"k": [NL, B, kvH, T, hd], "v": same, "mask": bool [B, T]}`` (T =
  ``max_length``, NL layers stacked on the leading axis in both scan and unscanned mode);
  ``mask`` marks slots holding real (non-pad) tokens.
  """
  return init_kv_cache(config.num_hidden_layers, batch, config.num_key_value_heads, max_length,
                       config.head_dim, dtype)


class Qwen3Model(nn.Module):
  """Qwen3/Qwen3-MoE/Qwen2 text decoder: layers + final ``norm`` (HF ``Qwen3Model`` minus the
  rotary module, and ``Qwen3VLTextModel`` with DeepStack).

  Holds ``embed_tokens`` (used by :meth:`embed`, not by ``__call__``, which takes embeddings so
  that the VL model can splice image features in).

  Attributes:
    config: :class:`Qwen3TextConfig`.
    scan_layers: run the layers under ``nn.scan``; params become ``layers/...`` with a leading
      ``LAYERS`` axis. Requires every layer to have the same MLP kind.
    remat: wrap each layer in ``nn.remat``.
  Call args:
    inputs_embeds: [B, L, D].
    rope_angles: float32 [B, L, hd/2], angles of the positions of these L tokens.
    attention_mask: bool/0-1 [B, L] (True = real token) or None (all real). Left padding works:
      pad keys are never attended; pad query rows produce finite garbage.
    deepstack_embeds: None or a sequence of K <= num_hidden_layers arrays [B, L, D]; entry i is
      added to the output of layer i (spec 8). Under scan the list is stacked to [K, B, L, D]
      and each layer picks its entry by index (zeros for i >= K), which costs K*B*L*D memory
      and one masked add per layer.
    visual_mask: bool [B, L] or None; restricts the DeepStack addition to visual positions.
    segment_ids: int [B, L] or None. Packed rows: 1..S per sample, 0 = padding. Attention is
      causal and confined to equal ids (padding attends only to padding, so every row is finite);
      combined with ``attention_mask`` when both are given. Without a cache, or with a static
      ``cache_index=0`` (prefill).
    kv_cache: None or the dict of :func:`init_cache`; the new tokens are written at slots
      ``cache_index .. cache_index + L - 1`` and attend to every valid slot up to their own.
    cache_index: int scalar (same for the whole batch), required with ``kv_cache``. A Python
      ``0`` (static) means "prefill into an empty cache": the old slots are not read at all.
    deterministic: disables attention dropout.
  Returns:
    (hidden [B, L, D] after the final norm, in ``dtype``, new kv_cache dict or None). Between the
    layers the residual stream is float32 when ``dtype`` is float16 (module docstring).
  Raises:
    ValueError: bad shapes/ranks, missing ``cache_index``, scan over mixed dense/MoE layers,
      more DeepStack entries than layers, ``segment_ids`` with a non-empty cache.
  Intermediates: with ``mutable=["intermediates"]`` every MoE layer's router logits are sown
  (see :func:`router_logits`).
  """
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers and not cfg.homogeneous:
      raise ValueError("scan_layers needs every layer to have the same MLP kind; this config mixes "
                       "dense and MoE layers (mlp_only_layers/decoder_sparse_step): "
                       "set scan_layers=False")
    layer_cls = Qwen3DecoderLayer
    if self.remat:  # argument 8 (self = 0) is the Python bool ``deterministic``
      layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan_layers, static_argnums=(8,))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0,) + (nn.broadcast,) * 6,
                        length=cfg.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: P.LAYERS})
      self.layers = scanned(cfg, sparse=cfg.is_sparse_layer(0), **kw)
    else:
      self.layers = [layer_cls(cfg, layer_idx=i, **kw) for i in range(cfg.num_hidden_layers)]

  def embed(self, input_ids):
    """int [B, L] -> [B, L, D] token embeddings (``embed_tokens``)."""
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds, rope_angles, attention_mask=None, deepstack_embeds=None,
               visual_mask=None, kv_cache=None, cache_index=None, deterministic: bool = True,
               segment_ids=None):
    cfg = self.config
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
      raise ValueError(f"inputs_embeds must be [B, L, {cfg.hidden_size}], got "
                       f"{inputs_embeds.shape}")
    batch, length, _ = inputs_embeds.shape
    if rope_angles.shape != (batch, length, cfg.head_dim // 2):
      raise ValueError(f"rope_angles must be [B, L, head_dim/2] = "
                       f"{(batch, length, cfg.head_dim // 2)}, got {rope_angles.shape}; compute "
                       "them from position ids with vlm.nn.rope")
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    if attention_mask.shape != (batch, length):
      raise ValueError(f"attention_mask must be [B, L] = {(batch, length)}, got "
                       f"{attention_mask.shape}")
    attention_mask = jnp.asarray(attention_mask, bool)
    if segment_ids is not None:
      if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"segment_ids must be int [B, L] = {(batch, length)} (1..S per packed "
                         f"sample, 0 = padding), got {segment_ids.shape}")
      if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
      if kv_cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
        raise ValueError("segment_ids (packed rows) work without a cache or for a prefill into an "
                         "empty cache (static cache_index=0); decode steps take attention_mask only")

    deepstack = None
    if deepstack_embeds is not None and len(deepstack_embeds):
      if len(deepstack_embeds) > cfg.num_hidden_layers:
        raise ValueError(f"{len(deepstack_embeds)} deepstack_embeds for "
                         f"{cfg.num_hidden_layers} layers")
      for ds in deepstack_embeds:
        if ds.shape != inputs_embeds.shape:
          raise ValueError(f"each deepstack_embeds entry must be [B, L, D] = "
                           f"{inputs_embeds.shape} (scattered to visual positions), got {ds.shape}")
      deepstack = jnp.stack([jnp.asarray(ds, layers.residual_dtype(self.dtype))
                             for ds in deepstack_embeds])
    if visual_mask is not None:
      if visual_mask.shape != (batch, length):
        raise ValueError(f"visual_mask must be [B, L] = {(batch, length)}, got "
                         f"{visual_mask.shape}")
      visual_mask = jnp.asarray(visual_mask, bool)

    ck = cv = new_cache_mask = None
    if kv_cache is not None:
      if cache_index is None:
        raise ValueError("cache_index is required with kv_cache (first slot of the new tokens)")
      expected = (cfg.num_hidden_layers, batch)
      if kv_cache["k"].shape[:2] != expected or kv_cache["mask"].shape[0] != batch:
        raise ValueError(f"kv_cache k must be [NL, B, kvH, T, hd] with NL, B = {expected}, got "
                         f"{kv_cache['k'].shape}; build it with init_cache")
      if isinstance(cache_index, int) and cache_index == 0:
        # a static 0 means an empty cache (prefill): skip the T empty slots entirely (masking
        # them would also hand XLA a constant all-False mask to fold at compile time)
        mask = (None, causal_padding_mask(attention_mask, batch, length, segment_ids))
      else:
        mask = cache_masks(attention_mask, kv_cache["mask"], cache_index)
      cache_index = jnp.asarray(cache_index, jnp.int32)
      new_cache_mask = jax.lax.dynamic_update_slice(kv_cache["mask"], attention_mask,
                                                    (0, cache_index))
      ck, cv = kv_cache["k"], kv_cache["v"]
    elif cfg.attention_implementation != "xla" or context_parallel_size() > 1:
      # blockwise / kernel / context-parallel attention takes the segment ids, never a dense
      # [B, 1, L, L] mask
      mask = P.constrain(_attention_segments(attention_mask, segment_ids), (P.BATCH, P.SEQUENCE))
    else:
      mask = causal_padding_mask(attention_mask, batch, length, segment_ids)

    h = jnp.asarray(inputs_embeds, layers.residual_dtype(self.dtype))  # float32 for float16
    # token axis SEQUENCE: split over the "context" mesh axis under context parallelism
    h = P.constrain(h, (P.BATCH, P.SEQUENCE, P.EMBED))
    angles = P.constrain(jnp.asarray(rope_angles, jnp.float32), (P.BATCH, P.SEQUENCE, None))
    if deepstack is not None:
      deepstack = P.constrain(deepstack, (None, P.BATCH, P.SEQUENCE, P.EMBED))
    if visual_mask is not None:
      visual_mask = P.constrain(visual_mask, (P.BATCH, P.SEQUENCE))
    if self.scan_layers:
      xs = (jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32), ck, cv)
      h, (nk, nv) = self.layers(h, xs, angles, mask, deepstack, visual_mask, cache_index,
                                deterministic)
    else:
      nks, nvs = [], []
      for i, layer in enumerate(self.layers):
        xs = (jnp.asarray(i, jnp.int32), None if ck is None else ck[i],
              None if cv is None else cv[i])
        h, (k_i, v_i) = layer(h, xs, angles, mask, deepstack, visual_mask, cache_index,
                              deterministic)
        nks.append(k_i)
        nvs.append(v_i)
      nk = None if ck is None else jnp.stack(nks)
      nv = None if cv is None else jnp.stack(nvs)
    h = self.norm(h)
    new_cache = None
    if kv_cache is not None:  # one in-place write of every layer's new keys/values
      start = (0, 0, 0, cache_index, 0)
      heads_first = lambda x, c: jnp.asarray(jnp.swapaxes(x, 2, 3), c.dtype)  # [NL,B,kvH,L,hd]
      new_cache = {"k": jax.lax.dynamic_update_slice(ck, heads_first(nk, ck), start),
                   "v": jax.lax.dynamic_update_slice(cv, heads_first(nv, cv), start),
                   "mask": new_cache_mask}
    return h, new_cache


class Qwen3LM(nn.Module):
  """Causal LM: ``model`` (:class:`Qwen3Model`, owns ``embed_tokens``) + ``lm_head`` (HF
  ``Qwen3ForCausalLM``/``Qwen3MoeForCausalLM``/``Qwen2ForCausalLM``).

  ``lm_head/kernel`` [D, V] exists only when ``tie_word_embeddings`` is False; tied models reuse
  ``model/embed_tokens/embedding``.

  Methods:
    embed(input_ids int [B, L]) -> [B, L, D].
    logits(hidden [B, L, D]) -> float32 [B, L, V] (matmul in the compute dtype, then cast); any
      leading axes, so a loss can call it on chunks via ``apply(..., method=Qwen3LM.logits)``.
    __call__(input_ids [B, L], rope_angles, attention_mask=None, deepstack_embeds=None,
      visual_mask=None, kv_cache=None, cache_index=None, deterministic=True, segment_ids=None,
      return_hidden=False)
      -> (logits float32 [B, L, V] or, with ``return_hidden``, the final normed hidden states
      [B, L, D] in ``dtype``; new kv_cache or None); touches every parameter (use it for
      ``init``). ``segment_ids`` as :class:`Qwen3Model`.
  """
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.model = Qwen3Model(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                            scan_layers=self.scan_layers, remat=self.remat)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, kernel_axes=(P.EMBED, P.VOCAB), use_bias=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, input_ids):
    return self.model.embed(input_ids)

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return jnp.asarray(out, jnp.float32)

  def __call__(self, input_ids, rope_angles, attention_mask=None, deepstack_embeds=None,
               visual_mask=None, kv_cache=None, cache_index=None, deterministic: bool = True,
               segment_ids=None, return_hidden: bool = False):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int [B, L], got shape {input_ids.shape}")
    h, cache = self.model(self.embed(input_ids), rope_angles, attention_mask, deepstack_embeds,
                          visual_mask, kv_cache, cache_index, deterministic, segment_ids)
    if return_hidden:
      if self.is_initializing():
        self.logits(h[:, :1])  # init with return_hidden still creates lm_head
      return h, cache
    return self.logits(h), cache


# ------------------------------------------------------------------------------------------------
# Training helpers: the output projection as an array, the sown router logits.


def lm_head_kernel(params, tie_word_embeddings: bool):
  """The output projection ``W`` [D, V] with ``logits = hidden @ W`` (HF ``lm_head.weight.T``).

  Works on the parameters of :class:`Qwen3LM` (``model/...``) and of the VL models
  (``language_model/...``), with or without the outer ``{"params": ...}`` level and in either
  layer layout. Tied models (``tie_word_embeddings``) return ``embed_tokens/embedding`` transposed,
  so a gradient through it reaches the embedding. Plain indexing: use it inside a jitted loss to
  take logits chunk by chunk (``hidden[:, i:j] @ W``) instead of materialising [B, L, V].

  Args:
    params: parameter dict (unboxed arrays).
    tie_word_embeddings: the text config's flag.
  Returns:
    [D, V] in the parameter dtype.
  Raises:
    KeyError: naming the missing entry (e.g. an untied config with a tied checkpoint's params).
  """
  p = params["params"] if "params" in params else params
  if tie_word_embeddings:
    for key in ("language_model", "model"):
      if key in p:
        return jnp.asarray(p[key]["embed_tokens"]["embedding"]).T
    raise KeyError(f"tied output projection: no 'language_model' or 'model' entry holding "
                   f"embed_tokens/embedding among {sorted(p)}")
  if "lm_head" not in p:
    raise KeyError(f"untied output projection: no 'lm_head' among {sorted(p)}; is "
                   "tie_word_embeddings set as in the checkpoint's config?")
  return jnp.asarray(p["lm_head"]["kernel"])


_ROUTER_PATH = re.compile(r"^layers(?:_(\d+))?$")


def router_logits(intermediates) -> tuple[jax.Array, ...]:
  """The MoE router logits sown by a forward pass, one float32 [T, E] array per MoE layer.

  ``T = B * L`` (row-major over the batch, as HF's ``router_logits``); values are the gate outputs
  before the softmax. Layer order: unscanned ``layers_{i}`` sorted by ``i``; scanned ``layers``
  (leading ``LAYERS`` axis) split into its layers. Dense layers contribute nothing.
  Usage: ``out, state = model.apply(variables, ..., mutable=["intermediates"])`` then
  ``router_logits(state["intermediates"])``; feed them to the load-balancing loss (HF
  ``load_balancing_loss_func``, padding masked by the caller).

  Args:
    intermediates: the ``"intermediates"`` collection (or the dict holding it).
  Returns:
    tuple of float32 [T, E] (empty for a dense model).
  """
  tree = intermediates.get("intermediates", intermediates) if isinstance(
      intermediates, Mapping) else intermediates
  found = []

  def walk(node, layer):
    if not isinstance(node, Mapping):
      return
    for key, value in node.items():
      if key == "router_logits":
        arrays = value if isinstance(value, (tuple, list)) else (value,)
        for a in arrays:
          found.append((layer, a))
        continue
      m = _ROUTER_PATH.match(str(key))
      walk(value, (-1 if m.group(1) is None else int(m.group(1))) if m else layer)

  walk(tree, None)
  out = []
  for layer, a in sorted(found, key=lambda t: -2 if t[0] is None else t[0]):
    a = jnp.asarray(a, jnp.float32)
    if layer == -1:  # scanned: [NL, T, E]
      out.extend(a[i] for i in range(a.shape[0]))
    else:
      out.append(a)
  return tuple(out)


# ------------------------------------------------------------------------------------------------
# Layer stacking helpers (conversion between scan and unscanned parameter trees).

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(params):
  """Unscanned -> scanned tree: every dict holding ``layers_0 .. layers_{N-1}`` gets them replaced
  by one ``layers`` entry whose leaves are stacked on a new leading axis.

  Works on any nesting (e.g. ``{"params": {"model": {...}}}``); other keys are kept.
  Raises:
    ValueError: non-contiguous layer indices or layers with different structures.
  """
  if not isinstance(params, Mapping):
    return params
  idx = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(str(k))))
  out = {k: stack_layers(v) for k, v in params.items() if not _LAYER_KEY.match(str(k))}
  if idx:
    if idx != list(range(len(idx))):
      raise ValueError(f"layer indices must be 0..N-1 without gaps, got {idx}")
    if "layers" in out:
      raise ValueError("tree has both 'layers' and 'layers_{i}' entries")
    trees = [params[f"layers_{i}"] for i in idx]
    structure = jax.tree_util.tree_structure(trees[0])
    for i, t in enumerate(trees):
      if jax.tree_util.tree_structure(t) != structure:
        raise ValueError(f"layers_{i} differs in structure from layers_0 (mixed dense/MoE "
                         "layers cannot be stacked)")
    out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
  return out


def unstack_layers(params):
  """Scanned -> unscanned tree: every ``layers`` subtree (a dict of arrays with a leading layer
  axis) becomes ``layers_0 .. layers_{N-1}``. Inverse of :func:`stack_layers`."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for k, v in params.items():
    if k == "layers" and isinstance(v, Mapping):
      leaves = jax.tree_util.tree_leaves(v)
      if not leaves:
        continue
      n = leaves[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], v)
    else:
      out[k] = unstack_layers(v)
  return out


def layer_kinds(config: Qwen3TextConfig) -> Sequence[str]:
  """``"moe"`` or ``"dense"`` per layer (for converters and docs)."""
  return ["moe" if config.is_sparse_layer(i) else "dense" for i in range(config.num_hidden_layers)]
