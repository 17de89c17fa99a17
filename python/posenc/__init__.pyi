# Type stubs of the posenc package (the extension module posenc._posenc). The docstrings, with
# units, shapes and defaults, are in the module itself: help(posenc.attention).
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union, overload

# An array used in place: numpy.ndarray, torch.Tensor (CPU), or any object with __dlpack__ or the
# buffer protocol. float16, bfloat16 (torch), float32 or float64 for matrices; int64 positions;
# int32 (or int64, copied) index arrays.
Array = Any
# None (0, 1, ..., n-1), a range with step 1, an int64 array, or a sequence of ints.
Positions = Union[None, range, Sequence[int], Array]
IndexArray = Union[Sequence[int], Array]
Encoding = Union[None, "Rope", "MRope", "Alibi", "T5Bias", "ShawRelative"]
DType = Union[str, Any]  # "float32", "float64", numpy.float32, numpy.float64
# attention and Rope.rotate: 'thd' [tokens, heads, head_dim] (3-D default), 'htd' [heads, tokens, head_dim],
# 'bhtd' [batch, heads, tokens, head_dim] (4-D default), 'bthd' [batch, tokens, heads, head_dim].
Layout = Optional[Literal["thd", "htd", "bhtd", "bthd"]]

__version__: str

class PreconditionError(ValueError): ...

class LinearScaling:
    factor: float
    def __init__(self, *, factor: float = 1.0) -> None: ...

class NtkAwareScaling:
    alpha: float
    def __init__(self, *, alpha: float = 1.0) -> None: ...

class DynamicNtkScaling:
    factor: float
    original_max_position: int
    sequence_length: int
    def __init__(self, *, factor: float = 1.0, original_max_position: int = 2048, sequence_length: int = 0) -> None: ...

class YarnScaling:
    factor: float
    original_max_position: int
    def __init__(self, *, factor: float = 1.0, original_max_position: int = 4096, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, mscale: float = 0.0, mscale_all_dim: float = 0.0,
                 truncate: bool = True) -> None: ...

class Llama3Scaling:
    factor: float
    original_max_position: int
    def __init__(self, *, factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                 original_max_position: int = 8192) -> None: ...

class LongRopeScaling:
    def __init__(self, *, short_factor: Sequence[float], long_factor: Sequence[float],
                 original_max_position: int = 4096, max_position: int = 0,
                 choice: Literal["per_length", "fixed_long"] = "per_length", sequence_length: int = 0,
                 factor: float = 0.0) -> None: ...

Scaling = Union[None, LinearScaling, NtkAwareScaling, DynamicNtkScaling, YarnScaling, Llama3Scaling, LongRopeScaling]

class Rope:
    def __init__(self, *, head_dim: int = 128, rotary_dim: int = 0, base: float = 10000.0,
                 layout: Literal["half_split", "interleaved"] = "half_split", scaling: Scaling = None,
                 rope_scaling: Optional[Dict[str, Any]] = None, attention_factor: Optional[float] = None) -> None: ...
    def rotate(self, x: Array, positions: Positions = None, *, layout: Layout = None) -> None: ...
    def cos_sin(self, positions: Positions) -> Tuple[Array, Array]: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def rotary_dim(self) -> int: ...
    @property
    def base(self) -> float: ...
    @property
    def layout(self) -> str: ...
    @property
    def inv_freq(self) -> Array: ...
    @property
    def magnitude(self) -> float: ...
    @property
    def name(self) -> str: ...

class MRope:
    def __init__(self, *, head_dim: int = 128, mrope_section: Sequence[int], rotary_dim: int = 0,
                 base: float = 10000.0, layout: Literal["half_split", "interleaved"] = "half_split",
                 interleaved: bool = False) -> None: ...
    def rotate(self, x: Array, positions: Union[Sequence[int], Array]) -> None: ...
    def axis_of_pair(self, k: int) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def axes(self) -> int: ...
    @property
    def name(self) -> str: ...

class AxialRope:
    def __init__(self, *, head_dim: int = 64, rotary_dim: int = 0, base: float = 10000.0,
                 layout: Literal["half_split", "interleaved"] = "half_split") -> None: ...
    def rotate(self, x: Array, positions: Union[Sequence[int], Array]) -> None: ...
    @property
    def head_dim(self) -> int: ...

class Sinusoidal:
    def __init__(self, *, dim: int = 512, base: float = 10000.0,
                 layout: Literal["interleaved", "concatenated"] = "interleaved", shifted_denominator: bool = False,
                 position_offset: int = 0) -> None: ...
    def add_to(self, x: Array, positions: Positions = None) -> None: ...
    def table(self, positions: Positions, dtype: DType = "float32") -> Array: ...
    @property
    def dim(self) -> int: ...
    @property
    def frequencies(self) -> Array: ...

class Alibi:
    def __init__(self, *, num_heads: int = 8, head_offset: int = 0, form: Literal["causal", "symmetric"] = "causal",
                 max_bias: float = 8.0, slopes: Optional[Union[Sequence[float], Array]] = None) -> None: ...
    @property
    def slopes(self) -> Array: ...
    def bias(self, head: int, qpos: int, kpos: int) -> float: ...
    def bias_tile(self, head: int, qpos: Positions, kpos: Positions, dtype: DType = "float32") -> Array: ...

class T5Bias:
    def __init__(self, table: Array, *, max_distance: int = 128, bidirectional: bool = True,
                 head_offset: int = 0) -> None: ...
    def bucket(self, relative: int) -> int: ...
    def bias(self, head: int, qpos: int, kpos: int) -> float: ...
    def bias_tile(self, head: int, qpos: Positions, kpos: Positions, dtype: DType = "float32") -> Array: ...

class ShawRelative:
    def __init__(self, key_table: Array, value_table: Array) -> None: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def max_relative_position(self) -> int: ...

@overload
def attention(q: Array, k: Array, v: Array, qpos: Positions = None, kpos: Positions = None,
              encoding: Encoding = None, *, heads: Optional[int] = None, kv_heads: Optional[int] = None,
              layout: Layout = None, scale: Optional[float] = None, softcap: float = 0.0, sinks: Optional[Union[Sequence[float], Array]] = None,
              causal: bool = False, window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
              return_lse: Literal[False] = False,
              out: Optional[Array] = None, threads: int = 0, q_tile: int = 0, k_tile: int = 0,
              bf16_qk: bool = False) -> Array: ...
@overload
def attention(q: Array, k: Array, v: Array, qpos: Positions = None, kpos: Positions = None,
              encoding: Encoding = None, *, heads: Optional[int] = None, kv_heads: Optional[int] = None,
              layout: Layout = None, scale: Optional[float] = None, softcap: float = 0.0, sinks: Optional[Union[Sequence[float], Array]] = None,
              causal: bool = False, window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
              return_lse: Literal[True],
              out: Optional[Array] = None, threads: int = 0, q_tile: int = 0, k_tile: int = 0,
              bf16_qk: bool = False) -> Tuple[Array, Array]: ...

def attention_backward(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, qpos: Positions = None,
                       kpos: Positions = None, encoding: Encoding = None, *, heads: Optional[int] = None,
                       kv_heads: Optional[int] = None, layout: Optional[str] = None, scale: Optional[float] = None,
                       softcap: float = 0.0,
                       sinks: Optional[Union[Sequence[float], Array]] = None, causal: bool = False,
                       window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
                       param_grads: bool = True, dq: Optional[Array] = None, dk: Optional[Array] = None,
                       dv: Optional[Array] = None, threads: int = 0, q_tile: int = 0,
                       k_tile: int = 0) -> Tuple[Array, Array, Array, Dict[str, Array]]: ...

@overload
def attention_varlen(q: Array, k: Array, v: Array, cu_q: IndexArray, cu_k: IndexArray, qpos: Positions = None,
                     kpos: Positions = None, encoding: Encoding = None, *, heads: Optional[int] = None,
                     kv_heads: Optional[int] = None, scale: Optional[float] = None, softcap: float = 0.0,
                     sinks: Optional[Union[Sequence[float], Array]] = None, causal: bool = False,
                     window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
                     return_lse: Literal[False] = False,
                     out: Optional[Array] = None, threads: int = 0, q_tile: int = 0, k_tile: int = 0,
              bf16_qk: bool = False) -> Array: ...
@overload
def attention_varlen(q: Array, k: Array, v: Array, cu_q: IndexArray, cu_k: IndexArray, qpos: Positions = None,
                     kpos: Positions = None, encoding: Encoding = None, *, heads: Optional[int] = None,
                     kv_heads: Optional[int] = None, scale: Optional[float] = None, softcap: float = 0.0,
                     sinks: Optional[Union[Sequence[float], Array]] = None, causal: bool = False,
                     window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
                     return_lse: Literal[True],
                     out: Optional[Array] = None, threads: int = 0, q_tile: int = 0,
                     k_tile: int = 0, bf16_qk: bool = False) -> Tuple[Array, Array]: ...

@overload
def paged_attention(q: Array, k_cache: Array, v_cache: Array, block_table: IndexArray, lengths: IndexArray,
                    cu_q: IndexArray, qpos: Positions, encoding: Encoding = None, *, page_size: Optional[int] = None,
                    keys: Optional[Literal["rotated", "raw"]] = None, positions: Positions = None,
                    heads: Optional[int] = None, kv_heads: Optional[int] = None, scale: Optional[float] = None,
                    softcap: float = 0.0, sinks: Optional[Union[Sequence[float], Array]] = None,
                    causal: bool = False, window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
                    return_lse: Literal[False] = False,
                    out: Optional[Array] = None, threads: int = 0, q_tile: int = 0, k_tile: int = 0,
              bf16_qk: bool = False) -> Array: ...
@overload
def paged_attention(q: Array, k_cache: Array, v_cache: Array, block_table: IndexArray, lengths: IndexArray,
                    cu_q: IndexArray, qpos: Positions, encoding: Encoding = None, *, page_size: Optional[int] = None,
                    keys: Optional[Literal["rotated", "raw"]] = None, positions: Positions = None,
                    heads: Optional[int] = None, kv_heads: Optional[int] = None, scale: Optional[float] = None,
                    softcap: float = 0.0, sinks: Optional[Union[Sequence[float], Array]] = None,
                    causal: bool = False, window: Tuple[int, int] = (-1, -1), chunk_size: Optional[int] = None,
                    return_lse: Literal[True],
                    out: Optional[Array] = None, threads: int = 0, q_tile: int = 0,
                    k_tile: int = 0, bf16_qk: bool = False) -> Tuple[Array, Array]: ...

def paged_append(k_cache: Array, v_cache: Array, block_table: IndexArray, lengths: IndexArray, k_new: Array,
                 v_new: Array, cu_new: IndexArray, encoding: Encoding = None, *, page_size: Optional[int] = None,
                 keys: Optional[Literal["rotated", "raw"]] = None, positions: Positions = None) -> None: ...

def layer_encoding(config: Dict[str, Any], layer: int) -> Dict[str, Any]: ...

def query_temperature(positions: Positions, *, floor_scale: int = 8192, attn_scale: float = 0.1) -> Array: ...

def simd_level(*, detected: bool = False) -> str: ...

def set_simd_cap(level: str) -> str: ...

def cpu_has_avx512_bf16() -> bool: ...
