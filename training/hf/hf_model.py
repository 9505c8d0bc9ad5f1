"""GPTHF and its GPT baseline as a ``transformers`` model: the classes of ``modeling_gpthf.py``.

``gpthf export-hf`` writes this module, together with the model (``training.model``) and the
cached decoders (``training.generation.decode``), into one self-contained ``modeling_gpthf.py``
(``training.hf.modeling_source``), so that ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` runs the very code we train and test with, and needs only torch and
transformers (numpy comes with transformers). Its ``from training...`` imports are removed
there: the names are defined above it in the same file.

Sentence ends: GPTHF needs them. A prompt marks the end of each sentence with the
end-of-sentence token (``<|endofsentence|>``); the last sentence may stay open. The model's
``eos_token_id`` is the end-of-document token, so ``generate()`` stops at the end of a document.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from training.generation.decode import MODES, decoder_class
from training.generation.decoders import _Decoder, _State, sentence_ids_for
from training.model.transformer import ModelConfig, Transformer


class GPTHFConfig(PreTrainedConfig):
    """The gpthf ``ModelConfig`` (under ``gpthf``) plus what transformers expects to find."""

    model_type = "gpthf"

    def __init__(
        self,
        gpthf: dict[str, Any] | None = None,
        gpthf_generation_mode: str = "kv",
        gpthf_export: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.gpthf = dict(gpthf or {})
        self.gpthf_generation_mode = gpthf_generation_mode
        """Cached mode ``generate()`` uses: "kv" (both), "sentence-cache" (GPTHF), "full"."""
        self.gpthf_export = dict(gpthf_export or {})
        """Provenance and the folder's format version (``HF_FORMAT``)."""
        model = ModelConfig.from_dict(self.gpthf) if self.gpthf else None
        if model is not None:
            kwargs.setdefault("vocab_size", model.vocab_size)
            kwargs.setdefault("hidden_size", model.d_model)
            kwargs.setdefault("num_hidden_layers", model.n_layers)
            kwargs.setdefault("num_attention_heads", model.n_heads)
            kwargs.setdefault("eos_token_id", model.eod_id)
            kwargs.setdefault("pad_token_id", model.pad_id)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)


class GPTHFForCausalLM(PreTrainedModel, GenerationMixin):
    """``forward`` is ``Transformer.forward`` over (left- or right-) padded rows; ``generate``
    runs the exact cached decoders of ``gpthf generate``."""

    config_class = GPTHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # noqa: RUF012

    def __init__(self, config: GPTHFConfig) -> None:
        super().__init__(config)
        self.model = Transformer(ModelConfig.from_dict(config.gpthf))
        self.post_init()

    @property
    def gpthf_config(self) -> ModelConfig:
        return self.model.config

    def _init_weights(self, module: Any) -> None:
        # Weights come from the checkpoint; a fresh model keeps Transformer's own init.
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our decoders keep their own caches (see prepare_inputs_for_generation)

    def get_input_embeddings(self) -> Any:
        return self.model.embed

    def get_output_embeddings(self) -> Any:
        return self.model.lm_head

    # -- the full forward ---------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: GPTHFDecodingCache | None = None,
        use_cache: bool | None = None,
        gpthf_decode: str | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of ``Transformer.forward``. Rows may be padded on either side
        (``attention_mask``); sentence ids come from the end-of-sentence tokens, and
        ``document_ids`` (optional) keep several documents of a row apart. ``labels`` give the
        usual shifted next-token loss (-100 is ignored)."""
        if gpthf_decode:
            return self._decode_step(input_ids, attention_mask, cache, gpthf_decode)
        mask = _mask(input_ids, attention_mask)
        order, lengths = _real_first(mask)  # pads moved to the end of each row
        ids = input_ids.gather(1, order)
        sid = self._sentence_ids(ids, lengths)
        docs = None if document_ids is None else document_ids.gather(1, order)
        logits_packed = self.model(ids, sid, docs)
        logits = torch.empty_like(logits_packed).scatter_(
            1, order[:, :, None].expand_as(logits_packed), logits_packed
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _sentence_ids(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) sentence ids of right-aligned rows (-1 on pads); GPTHF refuses a sentence
        longer than it was trained on."""
        c = self.gpthf_config
        sid = sentence_ids_for(ids, lengths, c.eos_id)
        if c.arch != "gpthf":
            return sid
        B, T = ids.shape
        row = torch.arange(B, device=ids.device)[:, None] * (T + 1)
        counts = torch.bincount(torch.where(sid >= 0, row + sid + 1, 0).flatten())
        longest = int(counts[1:].max()) if counts.numel() > 1 else 0
        if longest > c.max_sentence_tokens:
            raise ValueError(
                f"a sentence of {longest} tokens is longer than this GPTHF model supports "
                f"(max_sentence_tokens={c.max_sentence_tokens}, end-of-sentence included): "
                f"end each sentence of the prompt with the end-of-sentence token (id {c.eos_id}), "
                "or split the text with gpthf's sentence splitter"
            )
        return sid

    # -- generation: our decoders behind the transformers API ---------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: GPTHFDecodingCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Always our decoders, so that generation follows gpthf generate's rules in every mode;
        # use_cache=False means "full" (the whole forward at every step, no cache).
        mode = "full" if use_cache is False else self.config.gpthf_generation_mode
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "gpthf_decode": mode,
        }

    def _decode_step(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        cache: GPTHFDecodingCache | None,
        mode: str,
    ) -> CausalLMOutputWithPast:
        c = self.gpthf_config
        if cache is None:  # prefill: each row's real tokens, in order
            mask = _mask(input_ids, attention_mask)
            prompts = [row[m].tolist() for row, m in zip(input_ids, mask, strict=True)]
            if any(not p for p in prompts):
                raise ValueError("every prompt needs at least one token")
            order, lengths = _real_first(mask)
            self._sentence_ids(input_ids.gather(1, order), lengths)  # refuses overlong sentences
            cache = GPTHFDecodingCache(self.model, prompts, mode)
            logits = cache.decoder.prefill()
        else:
            logits = cache.feed(input_ids[:, cache.seen :])
        cache.seen = input_ids.shape[1]
        # gpthf generate's two rules, as logits: pad is never chosen, and a sentence that
        # reached max_sentence_tokens - 1 tokens ends with EOS-S.
        logits = logits.float().clone()
        logits[:, c.pad_id] = float("-inf")
        force = torch.from_numpy(cache.state.open_len >= c.max_sentence_tokens - 1)
        forced = torch.full_like(logits, float("-inf"))
        forced[:, c.eos_id] = 0.0
        logits = torch.where(force.to(logits.device)[:, None], forced, logits)
        return CausalLMOutputWithPast(logits=logits[:, None, :], cache=cache)  # type: ignore[arg-type]


class GPTHFDecodingCache:
    """A gpthf decoder (``training.generation.decode``) and its per-row state, carried by
    ``generate()`` from step to step as the model's ``cache``."""

    def __init__(self, model: Transformer, prompts: list[list[int]], mode: str) -> None:
        c = model.config
        if mode not in MODES[c.arch]:
            raise ValueError(f"gpthf_generation_mode {mode!r}: {c.arch} offers {MODES[c.arch]}")
        self.eos_id = c.eos_id
        self.state = _State.from_prompts(prompts, c.eos_id)
        # max_new=0: the caches grow as generation goes (transformers does not say how far).
        self.decoder: _Decoder = decoder_class(c, mode)(
            model, prompts, self.state, 0, c.max_sentence_tokens
        )
        self.seen = 0

    def feed(self, new: Tensor) -> Tensor:
        """Feed the new column(s) of tokens, one at a time; logits (B, V) after the last."""
        logits = None
        for t in range(new.shape[1]):
            tokens = new[:, t]
            active = np.ones(tokens.shape[0], dtype=bool)
            logits = self.decoder.step(tokens, active)
            self.state.feed(tokens.cpu().numpy(), active, self.eos_id)
        assert logits is not None
        return logits


def _mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    mask = attention_mask.bool()
    # Each row's real tokens must be one contiguous run (left or right padding).
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1) + mask[:, 0].long()
    if bool((starts > 1).any()):
        raise ValueError("attention_mask must mark one contiguous run of tokens per row")
    return mask


def _real_first(mask: Tensor) -> tuple[Tensor, Tensor]:
    """A permutation of each row putting its real tokens first (order kept), and the lengths."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order, mask.sum(dim=1)
