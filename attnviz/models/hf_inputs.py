"""The forward kwargs of an HF model for one request: token ids (text through the directory's
tokenizer), the decoder input of encoder-decoders, audio features, an image for the vision
tower of multi-tower models. ``PreparedCall.inputs`` keeps the kwargs so that the same call
can be repeated (e.g. with eager attention and ``output_attentions=True``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnviz.errors import UsageError, param
from attnviz.models.hf_maps import side_resolver, towers
from attnviz.models.sources import LoadedModel

if TYPE_CHECKING:
    from attnviz.sequence_inputs import PreparedCall, SequenceRequest

SPEECH_INPUTS = ("input_features", "input_values")


def parse_ids(text: str, name: str) -> torch.Tensor:
    """Token ids from 'a,b,c'; ``name``: the library parameter that gave them."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"{param(name)} '{text}' is not a comma-separated list of ids",
                         param=name) from exc
    if not ids:
        raise UsageError(f"{param(name)} is empty", param=name)
    if any(i < 0 for i in ids):
        raise UsageError(f"{param(name)} '{text}': token ids are >= 0", param=name)
    return torch.tensor([ids])  # (1, L)


def id_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """Token strings, or '#id' where there is no tokenizer or it has no string for an id."""
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [None] * len(ids)
    return [f"#{i}" if token is None else str(token) for i, token in zip(ids, tokens, strict=True)]


def _check_vocab(ids: torch.Tensor, config: Any, name: str) -> None:
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        raise UsageError(f"{param(name)}: id {int(ids.max())} is outside the vocabulary of "
                         f"{vocab} (config.json vocab_size)", param=name)


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def text_inputs(loaded: LoadedModel, request: SequenceRequest
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """input_ids and attention_mask from --text or --tokens (and --pad)."""
    tokenizer, config = loaded.tokenizer, _text_config(loaded.model.config)
    if request.text is not None:
        if tokenizer is None:
            raise UsageError(f"this model directory has no tokenizer for {param('text')}",
                             hint=f"use {param('tokens')} 5,17,3")
        batch = tokenizer([request.text], return_tensors="pt")
        ids, attention = batch["input_ids"], batch["attention_mask"]
    elif request.tokens is not None:
        ids = parse_ids(request.tokens, "tokens")
        attention = torch.ones_like(ids)
    else:
        raise UsageError(f"an HF text model needs {param('text')} or {param('tokens')}")
    _check_vocab(ids, config, "tokens")
    if request.pad:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = pad_id if isinstance(pad_id, int) else getattr(config, "pad_token_id", None)
        pad_id = pad_id if isinstance(pad_id, int) else 0
        ids = torch.cat([ids, torch.full((1, request.pad), pad_id)], dim=1)  # (1, L + pad)
        attention = torch.cat([attention, torch.zeros(1, request.pad, dtype=attention.dtype)],
                              dim=1)  # (1, L + pad)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] > limit:
        raise UsageError(f"the input is {ids.shape[1]} tokens; this model takes at most {limit} "
                         "(config.json max_position_embeddings)", hint=f"shorten {param('text')}")
    return {"input_ids": ids, "attention_mask": attention}, id_labels(tokenizer,
                                                                       ids[0].tolist())


def decoder_inputs(loaded: LoadedModel, request: SequenceRequest
                   ) -> tuple[torch.Tensor, list[str], list[str]]:
    """decoder_input_ids: --tgt-tokens as given, --tgt-text tokenised with
    decoder_start_token_id put first (as transformers shifts labels right), or just
    decoder_start_token_id."""
    config, tokenizer = loaded.model.config, loaded.tokenizer
    start = getattr(config, "decoder_start_token_id", None)
    notes: list[str] = []
    if request.tgt_tokens is not None:
        ids = parse_ids(request.tgt_tokens, "tgt_tokens")
    elif request.tgt_text is not None:
        if tokenizer is None:
            raise UsageError(f"this model directory has no tokenizer for {param('tgt_text')}",
                             hint=f"use {param('tgt_tokens')} 0,5,17")
        ids = tokenizer(text_target=[request.tgt_text], return_tensors="pt")["input_ids"]
        if isinstance(start, int) and int(ids[0, 0]) != start:
            ids = torch.cat([torch.tensor([[start]]), ids], dim=1)  # (1, 1 + T)
    else:
        if not isinstance(start, int):
            raise UsageError("this encoder-decoder names no decoder_start_token_id in "
                             "config.json",
                             hint=f"give the decoder input with {param('tgt_tokens')}")
        ids = torch.tensor([[start]])  # (1, 1)
        notes.append(f"decoder input: decoder_start_token_id {start} (give one with "
                     "--tgt-tokens or --tgt-text)")
    _check_vocab(ids, config, "tgt_tokens")
    limit = getattr(config, "max_target_positions", None)
    if isinstance(limit, int) and ids.shape[1] > limit:
        raise UsageError(f"the decoder input is {ids.shape[1]} tokens; this model takes at most "
                         f"{limit} (config.json max_target_positions)")
    return ids, id_labels(tokenizer, ids[0].tolist()), notes


def _accepted(module: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop kwargs the forward does not take (attention_mask for some models)."""
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return inputs
    return {k: v for k, v in inputs.items() if k in parameters}


def _lean_outputs(module: Any) -> dict[str, Any]:
    """Forward kwargs that drop outputs no attention map depends on: a causal LM's logits for
    all but the last position (16k tokens x a 32k vocabulary are 2 GiB of float32) and the
    key/value cache."""
    parameters = inspect.signature(module.forward).parameters
    lean: dict[str, Any] = {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            lean[name] = 1
            break
    if "use_cache" in parameters:
        lean["use_cache"] = False
    return lean


def image_inputs(loaded: LoadedModel, image: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """pixel_values through the directory's image processor, and the image it was given."""
    from PIL import Image

    from attnviz.image_inputs import open_rgb
    from attnviz.models.hf_loading import load_processor

    assert loaded.path is not None
    processor = load_processor(loaded.path, "image")
    if processor is None:
        raise UsageError(f"this model directory has no image processor for {param('image')}",
                         path=loaded.path,
                         hint="save one with processor.save_pretrained(directory)")
    picture = Image.fromarray(open_rgb(image))
    batch = processor(images=picture, return_tensors="pt")
    return {"pixel_values": batch["pixel_values"]}, picture


def prepare_hf(loaded: LoadedModel, request: SequenceRequest) -> PreparedCall:
    """One forward call of an HF model (or of one tower of a multi-tower model)."""
    from attnviz.models.hf_speech import speech_inputs
    from attnviz.sequence_inputs import PreparedCall

    model, config = loaded.model, loaded.model.config
    main = getattr(model, "main_input_name", "input_ids")
    tower_sides = towers(model)
    inputs: dict[str, torch.Tensor] = {}
    sides: dict[str, list[str]] = {}
    notes: list[str] = []
    has_text = request.text is not None or request.tokens is not None
    if main in SPEECH_INPUTS:
        if has_text:
            raise UsageError(f"a speech model takes {param('audio')} FILE.wav or "
                             f"{param('seq_len')} N, not "
                             f"{param('text')}/{param('tokens')}",
                             hint=f"give the decoder input with {param('tgt_tokens')}")
        inputs, sides["source"], notes = speech_inputs(loaded, request)
    elif request.audio is not None:
        raise UsageError(f"{param('audio')} needs a speech model; {type(model).__name__} takes "
                         f"{main}", param="audio")
    elif main == "pixel_values" and not tower_sides:
        if request.image is None:
            raise UsageError(f"{type(model).__name__} takes images: use {param('image')} FILE")
        inputs, _ = image_inputs(loaded, request.image)
    elif has_text or not tower_sides:
        inputs, sides["source"] = text_inputs(loaded, request)
    if request.image is not None and tower_sides and "pixel_values" not in inputs:
        pixels, _ = image_inputs(loaded, request.image)
        inputs.update(pixels)
    module = ""
    if tower_sides and not ("pixel_values" in inputs and "input_ids" in inputs):
        wanted = "image" if "pixel_values" in inputs else "source"
        module = next(name for name, side in tower_sides.items() if side == wanted)
        notes.append(f"only the {module} tower runs: give --text/--tokens and --image "
                     "for both")
    takes_decoder_ids = "decoder_input_ids" in inspect.signature(model.forward).parameters
    if getattr(config, "is_encoder_decoder", False) and takes_decoder_ids:  # not DETR
        decoder_ids, sides["target"], more = decoder_inputs(loaded, request)
        inputs["decoder_input_ids"] = decoder_ids
        notes += more
    elif request.tgt_tokens is not None or request.tgt_text is not None:
        raise UsageError(f"{param('tgt_tokens')}/{param('tgt_text')} give the decoder input of an "
                         f"encoder-decoder; {type(model).__name__} is not one", param="tgt_tokens")
    target = model.get_submodule(module) if module else model
    inputs = _accepted(target, inputs)
    call = {**inputs, **_lean_outputs(target)}
    prepared = PreparedCall(lambda: target(**call), sides.get("source", []),
                            sides.get("target", []), padded=request.pad)
    prepared.inputs, prepared.module, prepared.sides = inputs, module, sides
    prepared.layer_sides, prepared.notes = side_resolver(model), notes
    return prepared


def random_features(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.standard_normal(shape).astype(np.float32))
