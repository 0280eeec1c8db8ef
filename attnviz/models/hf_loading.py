"""Loading an HF model directory with transformers (``hf`` extra), safely and offline.

Before transformers sees the directory, ``hf_safety`` refuses custom code and configs that
contradict the weights. The attention implementation is sdpa where the architecture has it
(fast, and ``capture_attention`` recomputes the exact probabilities from its q, k and mask),
eager otherwise; ``EAGER_ONLY`` lists architectures whose sdpa path in transformers computes
something other than their eager path, where attnviz follows eager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnviz.errors import HeadsError, UsageError, param
from attnviz.heads_override import ConfigEdit, apply_config_edits
from attnviz.models.hf_safety import (
    SAFE_KWARGS,
    HFDirectoryError,
    check_built_model,
    check_layer_counts,
    read_json,
    refuse_custom_code,
)

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "merges.txt")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class EagerOnly:
    model_type: str
    applies: Callable[[Any], bool]
    reason: str


# where transformers' own sdpa and eager paths disagree, the eager path is the model's definition
EAGER_ONLY = (
    EagerOnly("falcon", lambda config: bool(getattr(config, "alibi", False)),
              "Falcon with ALiBi: transformers' sdpa path scales the ALiBi bias differently "
              "from its eager path; attnviz follows eager"),
)


@dataclass(frozen=True)
class Unsupported:
    model_type: str
    applies: Callable[[Any], bool]
    reason: str


# attention transformers computes in a way attnviz cannot capture per head: a clear refusal
UNSUPPORTED = (
    Unsupported("big_bird", lambda c: getattr(c, "attention_type", "") == "block_sparse",
                "BigBird's block-sparse attention (attention_type 'block_sparse') has no "
                "per-head maps to capture; save the config with attention_type "
                "'original_full' to see full attention"),
    Unsupported("bigbird_pegasus", lambda c: getattr(c, "attention_type", "") == "block_sparse",
                "BigBirdPegasus's block-sparse attention (attention_type 'block_sparse') has no "
                "per-head maps to capture; save the config with attention_type "
                "'original_full' to see full attention"),
)


@dataclass
class HFParts:
    model: Any
    config: Any
    attn_implementation: str
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


def import_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise UsageError("an HF model directory needs the 'hf' extra",
                         hint="pip install 'attnviz[hf]'") from exc
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no 'Loading' bars
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # attnviz says it
    return transformers


def choose_attn_implementation(cls: Any, config: Any, requested: str, path: Path
                               ) -> tuple[str | None, list[str]]:
    """'auto' -> None (transformers' own choice: sdpa in every sub-model that has it, eager in
    the others) unless an ``EAGER_ONLY`` rule applies; 'eager'/'sdpa' as asked."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"{param('attn_implementation')} {requested}: use "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}", param="attn_implementation")
    rule = next((r for r in EAGER_ONLY if r.model_type == getattr(config, "model_type", None)
                 and r.applies(config)), None)
    has_sdpa = bool(getattr(cls, "_supports_sdpa", False))
    if requested == "sdpa" and not has_sdpa:
        raise UsageError(f"{cls.__name__} has no sdpa attention in transformers", path=path,
                         hint=f"use {param('attn_implementation')} eager (or auto)")
    if requested == "auto":
        if rule is not None:
            return "eager", [f"eager attention: {rule.reason}"]
        return (None if has_sdpa else "eager"), []
    notes = [f"sdpa requested, but {rule.reason}"] if rule and requested == "sdpa" else []
    return requested, notes


def _auto_class(transformers: Any, config: Any, auto_name: str, path: Path) -> tuple[Any, Any]:
    auto = getattr(transformers, auto_name)
    try:
        return auto, auto._model_mapping[type(config)]
    except KeyError as exc:
        raise HFDirectoryError(f"transformers has no {auto_name} for model_type "
                               f"'{config.model_type}'", path=path) from exc


def load_config(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[Any, Any]:
    """(transformers, config) after the safety checks of ``hf_safety``."""
    refuse_custom_code(path)
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise HFDirectoryError("config.json is not a JSON object", path=path)
    check_layer_counts(raw, shapes, path)
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, **SAFE_KWARGS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HFDirectoryError(f"transformers cannot read config.json ({_first(exc)})",
                               path=path) from exc
    return transformers, config


def load_model(path: Path, shapes: dict[str, tuple[int, ...]], *,
               attn_implementation: str = "auto", auto_name: str = "AutoModel",
               edits: Sequence[ConfigEdit] = ()) -> HFParts:
    """Build on the meta device, check against the weights, then load for real.

    ``edits``: config settings a heads override changes (``heads_override.config_edits``);
    the model is built with them, or refused when they do not fit the weights."""
    transformers, config = load_config(path, shapes)
    apply_config_edits(config, edits)
    for rule in UNSUPPORTED:
        if rule.model_type == getattr(config, "model_type", None) and rule.applies(config):
            raise HFDirectoryError(rule.reason, path=path)
    auto, cls = _auto_class(transformers, config, auto_name, path)
    impl, notes = choose_attn_implementation(cls, config, attn_implementation, path)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = cls._from_config(config, attn_implementation=impl)
    except (ValueError, TypeError, RuntimeError, AttributeError, IndexError, KeyError,
            AssertionError, NotImplementedError) as exc:
        raise HFDirectoryError(f"transformers cannot build the model config.json describes "
                               f"({_first(exc)})", path=path) from exc
    try:
        check_built_model(skeleton, shapes, path)
    except HFDirectoryError as error:
        if not edits:
            raise
        changed = ", ".join(f"{e.key}={e.heads}" for e in edits)
        raise HeadsError(f"the model built with the heads override ({changed}) does not fit "
                         f"the weights: {error.message}", path=path, param="heads",
                         hint="give a count the weights allow, or drop the override") from None
    del skeleton
    try:
        model, info = auto.from_pretrained(path, config=config, attn_implementation=impl,
                                           output_loading_info=True, **SAFE_KWARGS)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise HFDirectoryError(f"transformers cannot load this directory ({_first(exc)})",
                               path=path) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        notes.append(f"{len(missing)} tensor(s) are not in the weights and are random: "
                     f"{', '.join(missing[:3])}")
    actual = getattr(model.config, "_attn_implementation", None) or impl or "eager"
    parts = HFParts(model.eval(), config, str(actual), notes=notes)
    parts.tokenizer = load_tokenizer(path, parts.notes)
    return parts


def load_tokenizer(path: Path, notes: list[str]) -> Any:
    """The directory's tokenizer, or None when it has no tokenizer files (transformers would
    otherwise build an empty one from the config that names every id None)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **SAFE_KWARGS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        notes.append(f"the tokenizer files cannot be loaded ({_first(exc)}); labels are ids")
        return None


def load_processor(path: Path, kind: str) -> Any:
    """The directory's image processor (kind 'image') or feature extractor ('audio')."""
    if not (path / PROCESSOR_FILE).is_file():
        return None
    transformers = import_transformers()
    auto = (transformers.AutoImageProcessor if kind == "image"
            else transformers.AutoFeatureExtractor)
    try:
        return auto.from_pretrained(path, **SAFE_KWARGS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise HFDirectoryError(f"cannot load {PROCESSOR_FILE} ({_first(exc)})",
                               path=path) from exc


def _first(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:240]
