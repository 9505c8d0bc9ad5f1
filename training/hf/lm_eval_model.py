"""The ``gpthf`` model for lm-evaluation-harness (0.4.13): ``--model gpthf``.

Importing this module registers the class (lm-eval has no plugin entry point for models, so
``gpthf lm-eval`` imports it and then runs lm-eval's own command line). ``pretrained`` is a
gpthf export, a training run folder (its ``export/``) or a Hugging Face folder written by
``gpthf export-hf``.

Text is split into sentences and tokenized by the data pipeline's own functions
(``pipeline.text``, ``pipeline.packing``), so GPTHF sees text as it was trained on it:

* ``loglikelihood_rolling`` (perplexity tasks): each document is tokenized as
  ``gpthf preprocess`` tokenizes it (every sentence ends with EOS-S, the last also with
  end-of-document) and packed into blocks of ``sentences_per_block`` sentences starting at the
  document's start; the blocks are scored by ``training.eval.scoring`` exactly as ``gpthf eval``
  scores shards (a block's first token has no context and is not scored).
* ``loglikelihood`` (multiple choice): context and context+continuation are encoded as prompts
  (``training.generation.text.encode_prompt``; the last sentence stays open unless it ends with
  sentence-final punctuation); the continuation is what the whole adds to the context.
* ``generate_until``: ``training.generation.decode.generate`` (kv mode), cut at the first stop
  string.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer

from pipeline.counters import Counters
from pipeline.encoding import SentenceEncoder
from pipeline.packing import BlockPacker, tokenize_batch
from pipeline.text import normalise, split_sentences
from training.eval.scoring import Sums, evaluate_rows
from training.export import load_export, resolve_export
from training.generation.decode import generate, sentence_ids_for
from training.generation.text import encode_prompt
from training.model import Transformer

log = logging.getLogger(__name__)
DEFAULT_SENTENCES_PER_BLOCK = 16


def load_any(pretrained: str) -> tuple[Transformer, str, int | None]:
    """(model, tokenizer JSON, sentences per block of its training data if known) of a gpthf
    export, a run folder or a folder ``gpthf export-hf`` wrote."""
    from pathlib import Path

    from pipeline.manifest import read_manifest

    if Path(pretrained, "modeling_gpthf.py").exists():
        from training.hf.folder import read_hf

        exported = read_hf(pretrained)
    else:
        exported = load_export(resolve_export(pretrained))
    model, config, tokenizer_json = exported.model, exported.config, exported.tokenizer_json
    S = None
    if config.data:
        try:
            manifest = read_manifest(config.data)
            S = manifest.sentences_per_block if manifest else None
        except Exception as exc:  # the data may live where this machine cannot read
            log.info("manifest of %s not readable (%s)", config.data, exc)
    return model, tokenizer_json, S


@register_model("gpthf")
class GPTHFLM(LM):
    """lm-eval model over a gpthf export (CPU or CUDA, fp32)."""

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 8,
        sentences_per_block: int | None = None,
        max_gen_toks: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        model, tokenizer_json, S = load_any(pretrained)
        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's own default is "cuda"; say so rather than fail on a CPU machine.
            log.warning("gpthf: no CUDA device here, evaluating on the CPU")
            device = "cpu"
        self.model = model.to(device)
        self._device = torch.device(device)
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.config = model.config
        self.encoder = SentenceEncoder(
            self.tok, eos_id=self.config.eos_id, eod_id=self.config.eod_id
        )
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.sentences_per_block = int(sentences_per_block or S or DEFAULT_SENTENCES_PER_BLOCK)
        self.max_gen_toks = int(max_gen_toks)
        self.sums = Sums()
        """Totals of every loglikelihood_rolling call (bytes as gpthf counts them)."""

    # -- perplexity ------------------------------------------------------------------------

    def _blocks(self, text: str) -> list[dict[str, Any]]:
        c = self.config
        sentences = split_sentences(normalise(text))
        if not sentences:
            return []
        batch = tokenize_batch(
            [("doc", sentences)],
            self.encoder,
            max_sentence_tokens=c.max_sentence_tokens,
            counters=Counters(),
        )
        packer = BlockPacker(self.sentences_per_block)
        return packer.add(batch).rows() + packer.flush().rows()

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            blocks = self._blocks(text)
            if not blocks:
                out.append(0.0)
                continue
            sums = evaluate_rows(
                self.model,
                blocks,
                pad_id=self.config.pad_id,
                eos_id=self.config.eos_id,
                device=self._device,
            )
            self.sums = self.sums + sums
            out.append(-sums.nll)
        return out

    # -- multiple choice -------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        c = self.config
        return encode_prompt(
            self.tok, text, eos_id=c.eos_id, max_sentence_tokens=c.max_sentence_tokens
        )

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        c = self.config
        pairs = []
        for req in requests:
            context, continuation = req.args
            whole = self._encode(context + continuation)
            ctx = self._encode(context) if context.strip() else []
            n = 0  # the common prefix: where the continuation's tokens start
            while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
                n += 1
            pairs.append((whole, max(n, 1)))
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size):
            batch = pairs[i : i + self.batch_size]
            width = max(len(w) for w, _ in batch)
            ids = torch.full((len(batch), width), c.pad_id, dtype=torch.long)
            for b, (w, _) in enumerate(batch):
                ids[b, : len(w)] = torch.tensor(w)
            lengths = torch.tensor([len(w) for w, _ in batch])
            sid = sentence_ids_for(ids, lengths, c.eos_id)
            with torch.no_grad():
                logp = self.model(ids.to(self._device), sid.to(self._device)).float()
                logp = logp.log_softmax(dim=-1).cpu()
            for b, (w, n) in enumerate(batch):
                target = torch.tensor(w[n:])
                pred = logp[b, n - 1 : len(w) - 1]
                ll = float(pred.gather(1, target[:, None]).sum())
                out.append((ll, bool((pred.argmax(dim=-1) == target).all())))
        return out

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kw.get("do_sample", False))
            result = generate(
                self.model,
                [self._encode(context)],
                max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)),
                mode="kv",
                temperature=float(kw.get("temperature", 1.0)) if do_sample else 0.0,
                seed=int(kw.get("seed", 0)),
            )
            text = self.tok.decode(result.tokens[0], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    # -- what lm-eval asks of every model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.config.eod_id

    @property
    def max_length(self) -> int:
        return self.sentences_per_block * self.config.max_sentence_tokens

    @property
    def tokenizer_name(self) -> str:
        return "gpthf"
