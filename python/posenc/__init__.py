"""posenc: positional encodings and blockwise attention on NumPy arrays and CPU torch tensors.

Encoders: ``Sinusoidal`` (added to token embeddings), ``Rope`` with its frequency policies
(``LinearScaling``, ``NtkAwareScaling``, ``DynamicNtkScaling``, ``YarnScaling``, ``Llama3Scaling``,
``LongRopeScaling``, or a Hugging Face ``rope_scaling`` dict), and the score biases ``Alibi``,
``T5Bias`` and ``ShawRelative``; multi-axis ``MRope`` (Qwen VL) and ``AxialRope`` (image patches);
``layer_encoding`` reads a layer's encoding and mask from a model config (Gemma 3, Llama 4, Qwen VL),
``query_temperature`` is Llama 4's NoPE-layer query scale. Attention: ``attention`` (one sequence, or a batch of sequences of
equal length), its gradients ``attention_backward``, and the engine step ``attention_varlen``, ``paged_attention``,
``paged_append``. Kernel sets: ``simd_level``, ``set_simd_cap`` (or the environment variable
``POSENC_SIMD_CAP``), ``cpu_has_avx512_bf16`` (``bf16_qk=True`` then multiplies with ``vdpbf16ps``). Training: ``posenc.torch`` (imported on first use, needs torch) has ``posenc.torch.attention``, a
``torch.autograd.Function`` over the C++ forward and backward, and modules holding learned T5 and Shaw tables.

Arrays are used in place, never copied: NumPy arrays, torch CPU tensors (through ``__dlpack__``) or
any buffer, float16, bfloat16 (torch), float32 or float64. ``help(posenc.attention)`` lists the
layouts; docs/python.md and docs/pytorch.md in the source tree have examples.
"""

from ._posenc import (
    Alibi,
    AxialRope,
    DynamicNtkScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    MRope,
    NtkAwareScaling,
    PreconditionError,
    Rope,
    ShawRelative,
    Sinusoidal,
    T5Bias,
    YarnScaling,
    __version__,
    attention,
    attention_backward,
    attention_varlen,
    layer_encoding,
    paged_append,
    paged_attention,
    query_temperature,
    cpu_has_avx512_bf16,
    set_simd_cap,
    simd_level,
)

__all__ = [
    "Alibi",
    "AxialRope",
    "DynamicNtkScaling",
    "LinearScaling",
    "Llama3Scaling",
    "LongRopeScaling",
    "MRope",
    "NtkAwareScaling",
    "PreconditionError",
    "Rope",
    "ShawRelative",
    "Sinusoidal",
    "T5Bias",
    "YarnScaling",
    "attention",
    "attention_backward",
    "attention_varlen",
    "cpu_has_avx512_bf16",
    "layer_encoding",
    "paged_append",
    "paged_attention",
    "query_temperature",
    "set_simd_cap",
    "simd_level",
]

# The public names belong to `posenc`, not to its extension module, in help(), reprs and pickles.
for _name in __all__:
    try:
        globals()[_name].__module__ = __name__
    except (AttributeError, TypeError):  # pragma: no cover (an object whose __module__ is fixed)
        pass
del _name


def __getattr__(name):
    # posenc.torch imports torch: loaded on first use, so that posenc imports without torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
