"""FIREATTN backend quartet for vLLM 0.26: Backend, Metadata, MetadataBuilder, Impl.

One backend class serves FP8 and BF16/FP16 layers alike (skip layers reach it with
kv_cache_dtype "auto"); each impl instance knows its own cache dtype, and the kernels pick
their path from the cache tensor's dtype.

KV-cache layout: [num_blocks, 2, num_kv_heads, block_size, head_size], num_blocks outermost
(vLLM may pad pages when FP8 and BF16 layers share a group; kernels use the runtime block
stride). The batch is split into decode rows (query length <= 1 + num_speculative_tokens,
run by ops.decode, CUDA-graph safe) and prefill rows (ops.prefill).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_fireattn import BACKEND_NAME, __version__, ops
from vllm_fireattn.backend._compat import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionSpec,
    AttentionType,
    CommonAttentionMetadata,
    DeviceCapability,
    MultipleOf,
    VllmConfig,
    extract_layer_index,
    get_current_vllm_config_or_none,
    is_quantized_kv_cache,
    logger,
    split_decodes_and_prefills,
    tensor_parallel_rank_and_size,
)
from vllm_fireattn.ops.plan import decode_num_splits
from vllm_fireattn.reference.quant import FP8_CACHE_DTYPES
from vllm_fireattn.settings import FireAttnSettings, resolve


SUPPORTED_HEAD_SIZES = (64, 128, 256)
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
NATIVE_KV_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class FireAttnBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", *FP8_KV_CACHE_DTYPES]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM maps the layer's backend back to its enum member by this name: the slot we occupy.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[FireAttnImpl]:
        return FireAttnImpl

    @staticmethod
    def get_builder_cls() -> type[FireAttnMetadataBuilder]:
        return FireAttnMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        if block_size % 16 != 0:
            raise ValueError(f"{BACKEND_NAME} needs a block size that is a multiple of 16, got {block_size}")
        return (num_blocks, 2, num_kv_heads, block_size, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # Physical = logical; with a leading layers dim, blocks stay outermost:
        # (num_blocks, num_layers, 2, num_kv_heads, block_size, head_size).
        return (1, 0, 2, 3, 4, 5) if include_num_layers_dimension else (0, 1, 2, 3, 4)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return True

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        return capability.major == 9

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_combination(
        cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse, use_mm_prefix,
        device_capability,
    ) -> str | None:
        native = NATIVE_KV_CACHE_DTYPES.get(kv_cache_dtype or "auto")
        if native is not None and native != dtype:
            return (
                f"{BACKEND_NAME}: kv_cache_dtype {kv_cache_dtype} with model dtype {dtype} is not supported; "
                "use kv_cache_dtype auto (the model dtype) or fp8"
            )
        return None

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                               use_mm_prefix, use_per_head_quant_scales, device_capability, attn_type,
                               **kwargs) -> list[str]:
        reasons = super().validate_configuration(
            head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse, use_mm_prefix,
            use_per_head_quant_scales, device_capability, attn_type, **kwargs,
        )
        return explain_reasons(reasons, head_size, dtype, kv_cache_dtype, block_size, device_capability)


def explain_reasons(reasons, head_size, dtype, kv_cache_dtype, block_size, device_capability) -> list[str]:
    """Turns vLLM's terse validation reasons into ones that say what FIREATTN accepts, and adds
    the kernels' availability (checked here, at backend selection, not at the first forward)."""
    detail = {
        "head_size not supported": f"head_size {head_size} not supported (FIREATTN supports {list(SUPPORTED_HEAD_SIZES)})",
        "dtype not supported": f"model dtype {dtype} not supported (FIREATTN supports float16, bfloat16)",
        "kv_cache_dtype not supported": (
            f"kv_cache_dtype {kv_cache_dtype!r} not supported (FIREATTN supports "
            f"{FireAttnBackend.supported_kv_cache_dtypes})"
        ),
        "block_size not supported": f"block_size {block_size} not supported (FIREATTN needs a multiple of 16)",
        "compute capability not supported": (
            f"compute capability {device_capability} not supported (FIREATTN kernels are built for Hopper, "
            "sm_90a: H100/H200/H20/GH200)"
        ),
    }
    out = [detail.get(r, r) for r in reasons]
    if not reasons:
        reason = ops.unavailable_reason(check_device=False)
        if reason is not None:
            out.append(f"FIREATTN kernels unavailable: {reason}")
        elif head_size not in ops.compiled_head_dims():
            out.append(
                f"head_size {head_size} was not compiled into this build of vllm-fireattn "
                f"(compiled: {ops.compiled_head_dims()}); rebuild without FIREATTN_HEAD_DIMS"
            )
    return out


@dataclass
class FireAttnMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    causal: bool
    # Decode rows come first (vLLM reorders the batch by reorder_batch_threshold).
    num_decodes: int
    num_decode_tokens: int
    decode_max_query_len: int  # static bound (1 + num_speculative_tokens): fixes the graph's grid
    decode_num_splits: int  # the split-KV plan (ops.decode_num_splits), made once per step
    num_prefills: int
    num_prefill_tokens: int
    # Per-part views, sliced once per step instead of once per layer.
    decode_query_start_loc: torch.Tensor
    decode_seq_lens: torch.Tensor
    decode_block_table: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    prefill_seq_lens: torch.Tensor
    prefill_block_table: torch.Tensor


class FireAttnMetadataBuilder(AttentionMetadataBuilder[FireAttnMetadata]):
    # Full CUDA graphs for uniform decode batches (spec-decode verification included); mixed
    # batches run attention eagerly between piecewise graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.decode_max_query_len = self.reorder_batch_threshold or 1
        self.num_kv_heads = getattr(kv_cache_spec, "num_kv_heads", 1)
        self.head_size = getattr(kv_cache_spec, "head_size", 128)
        self.fp8_cache = getattr(kv_cache_spec, "dtype", None) in FP8_CACHE_DTYPES
        model_config = getattr(vllm_config, "model_config", None)
        self.num_q_heads = (model_config.get_num_attention_heads(vllm_config.parallel_config)
                            if model_config is not None else self.num_kv_heads)
        self.fp16 = getattr(model_config, "dtype", None) == torch.float16
        self.settings = resolve(getattr(vllm_config, "additional_config", None))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FireAttnMetadata:
        cm = common_attn_metadata
        if not isinstance(cm.causal, bool) or not cm.causal:
            raise NotImplementedError(f"{BACKEND_NAME} supports causal decoder attention only")
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(
            cm, decode_threshold=self.decode_max_query_len
        )
        n = cm.num_reqs
        return FireAttnMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            causal=True,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            decode_max_query_len=self.decode_max_query_len,
            # Static shapes only (the padded batch size under CUDA graphs), so capture and replay agree.
            decode_num_splits=self.settings.decode_splits or decode_num_splits(
                num_decodes, self.num_q_heads, self.num_kv_heads, self.decode_max_query_len, self.head_size,
                self.fp8_cache, fp16=self.fp16),
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            decode_query_start_loc=cm.query_start_loc[: num_decodes + 1],
            decode_seq_lens=cm.seq_lens[:num_decodes],
            decode_block_table=cm.block_table_tensor[:num_decodes],
            prefill_query_start_loc=cm.query_start_loc[num_decodes : n + 1],
            prefill_seq_lens=cm.seq_lens[num_decodes:n],
            prefill_block_table=cm.block_table_tensor[num_decodes:n],
        )


class FireAttnImpl(AttentionImpl[FireAttnMetadata]):
    # Q is quantized inside the kernel (per-KV-head scale), so vLLM must hand it over unquantized.
    supports_quant_query_input: bool = False
    supports_dcp: bool = False
    can_return_lse_for_decode: bool = False
    _logged: ClassVar[bool] = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra_impl_args,
    ) -> None:
        if alibi_slopes is not None:
            raise NotImplementedError(f"{BACKEND_NAME} does not support ALiBi")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"{BACKEND_NAME} supports decoder attention only, got {attn_type}")
        if head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"{BACKEND_NAME}: head_size {head_size} not in {SUPPORTED_HEAD_SIZES}")
        unknown = {k: v for k, v in extra_impl_args.items() if v not in (None, False)}
        if unknown:
            raise NotImplementedError(f"{BACKEND_NAME} does not support these attention options: {unknown}")
        if kv_cache_dtype not in FireAttnBackend.supported_kv_cache_dtypes:
            raise ValueError(f"{BACKEND_NAME}: kv_cache_dtype {kv_cache_dtype!r} not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.is_fp8 = is_quantized_kv_cache(kv_cache_dtype)
        self.sliding_window = sliding_window
        self.window_left = -1 if sliding_window is None else int(sliding_window) - 1
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        if sinks is not None and sinks.shape != (num_heads,):
            raise ValueError(f"sinks must have shape ({num_heads},), got {tuple(sinks.shape)}")
        self.sinks = sinks
        self._sinks_f32: torch.Tensor | None = None
        # Model and settings come from the config vLLM sets while it builds the model.
        vllm_config = get_current_vllm_config_or_none()
        self._model_config = getattr(vllm_config, "model_config", None)
        self.settings: FireAttnSettings = resolve(getattr(vllm_config, "additional_config", None))
        self.settings.check_head_dim(head_size)  # every cache dtype prefills on the tensor-core kernel
        self._scale_table: dict[str, torch.Tensor] | None = None  # "q"/"k"/"v": [layers, local kv heads]
        self._layer_scales: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # by layer name
        if not FireAttnImpl._logged:
            FireAttnImpl._logged = True
            logger.info("Using %s attention backend (vllm-fireattn %s); settings: %s", BACKEND_NAME, __version__,
                        self.settings.describe())

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Sinks are loaded after __init__; keep one float32 copy at a fixed address (CUDA graphs).
        if self.sinks is not None:
            self._sinks_f32 = self.sinks.detach().to(torch.float32).contiguous()
        # Scale overrides live on the device before any CUDA graph is captured.
        if self.is_fp8 and self.settings.scales != "checkpoint" and self._scale_table is None:
            device = self.sinks.device if self.sinks is not None else _current_device()
            self._scale_table = scale_table(self.settings, self._model_config, self.num_kv_heads, self.head_size,
                                            device)

    def _scales(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) scales: the layer's own (checkpoint or 1.0), or the settings' override."""
        if self._scale_table is None:
            return layer._q_scale, layer._k_scale, layer._v_scale
        name = layer.layer_name
        if name not in self._layer_scales:  # views of the device table: no copy, safe inside CUDA graph capture
            t = self._scale_table
            i = extract_layer_index(name) if t["q"].dim() == 2 else None
            self._layer_scales[name] = tuple(t[k] if i is None else t[k][i] for k in ("q", "k", "v"))
        return self._layer_scales[name]

    def _float_sinks(self) -> torch.Tensor | None:
        if self.sinks is None:
            return None
        if self._sinks_f32 is None or self._sinks_f32.device != self.sinks.device:
            self.process_weights_after_loading(self.sinks.dtype)
        return self._sinks_f32

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        _, k_scale, v_scale = self._scales(layer)
        ops.cache_write(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FireAttnMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        m = attn_metadata
        sinks = self._float_sinks()
        scales = self._scales(layer)
        if m.num_decodes > 0:
            ops.decode(
                output, query, kv_cache, m.decode_block_table, m.decode_query_start_loc, m.decode_seq_lens,
                *scales, self.scale, m.decode_max_query_len, True, self.window_left, self.logits_soft_cap,
                sinks, None, num_splits=m.decode_num_splits,
            )
        if m.num_prefills > 0:
            ops.prefill(
                output, query, kv_cache, m.prefill_block_table, m.prefill_query_start_loc, m.prefill_seq_lens,
                *scales, self.scale, m.max_query_len, True, self.window_left, self.logits_soft_cap,
                sinks, None, promote_every=self.settings.promote_every, max_seq_len=m.max_seq_len,
            )
        return output


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_TABLES: dict[tuple, dict[str, torch.Tensor]] = {}


def scale_table(settings: FireAttnSettings, model_config, num_kv_heads: int, head_size: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The scale override shared by every layer of this worker: scales="one" gives 0-dim 1.0
    tensors; scales="calibration" gives [num_layers, this rank's KV heads] tables from the file,
    which must match the model (layers, total KV heads, head size)."""
    from vllm_fireattn import calibration

    rank, size = tensor_parallel_rank_and_size()
    key = (settings.scales, settings.calibration_file, str(device), rank, size)
    if key in _TABLES:
        return _TABLES[key]
    if settings.scales == "one":
        one = torch.ones((), dtype=torch.float32, device=device)
        table = {"q": one, "k": one, "v": one}
    else:
        cal = calibration.load(settings.calibration_file)
        if model_config is None:
            raise calibration.CalibrationError("no model config to check the calibration file against")
        cal.check_model(model_config.hf_text_config.num_hidden_layers, model_config.get_total_num_kv_heads(),
                        model_config.get_head_size(), settings.calibration_file)
        table = {k: v.to(device) for k, v in cal.scales(rank, size).items()}
        if table["k"].shape[1] != num_kv_heads:
            raise calibration.CalibrationError(
                f"calibration gives {table['k'].shape[1]} KV heads for tensor-parallel rank {rank} of {size}, "
                f"the layer has {num_kv_heads}")
        logger.info("FIREATTN: per-KV-head scales from %s (%d layers, KV heads %d/%d on TP rank %d)",
                    settings.calibration_file, cal.num_layers, num_kv_heads, cal.num_kv_heads, rank)
    _TABLES[key] = table
    return table
