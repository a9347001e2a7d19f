"""Detoxify training samples with TrustyAI TMaRCo: gated, batched, cached and resumable.

TMaRCo (MaRCo, Hallinan et al. 2023) scores each token of a sentence by how much an expert (trained on non-toxic
text) and an anti-expert (trained on toxic text) disagree about it when it is masked: the Jensen-Shannon distance
between their mask-filling distributions, divided by the sentence mean. Tokens scoring above ``mask_threshold`` are
masked and then filled left to right with the argmax of ``base + w_anti * anti_expert + w_expert * expert`` logits.

Two engines run that algorithm:

* ``trustyai``: TrustyAI's own :class:`~trustyai.language.detoxify.TMaRCo` (through :mod:`detox_sft.compat`), one
  sentence at a time: the reference.
* ``batched`` (the default): the same algorithm, token for token and string for string (the same tokenizer calls),
  over many sentences at once: the masked variants of many sentences are scored in one length-sorted padded batch,
  only the decoder positions and vocabulary rows that are used are computed, and the masked positions of many
  sentences are filled step by step together. Half precision on GPU; float32 on CPU, where its texts equal the
  reference's (tests/test_rephrase.py, parity on 200 sentences).

Only samples whose toxicity under the recipe's scorer reaches ``gate_threshold`` are rephrased: the mask threshold is
relative to the sentence mean, so TMaRCo would otherwise rewrite clean sentences too. Results are cached in SQLite
(``<run>/rephrase/cache``) keyed by text, settings and the models' identity, so an interrupted run resumes and a
repeated run recomputes nothing.

For the SFT data, :func:`detoxify_training_set` rephrases the *continuation* (the part the model learns to
generate; the loss is completion-only) and re-formats ``text`` with :func:`detox_sft.data.format_sample`, so the
prompt stays byte-identical and the ``Prompt: ...\\nContinuation: ...`` format is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import html
import json
import math
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.config import Recipe, RephraseConfig, load_recipe, resolve_ref

__all__ = [
    "continuation_of",
    "RephraseError",
    "EngineOutput",
    "RephraseSummary",
    "RephraseResult",
    "TMaRCoEngine",
    "ReferenceEngine",
    "BatchedEngine",
    "ADDED_FIELDS",
    "load_engine",
    "resolve_device",
    "models_fingerprint",
    "read_jsonl",
    "write_jsonl_atomic",
    "rephrase_dataset",
    "detoxify_training_set",
    "highlight_html",
    "plot_toxicity_histogram",
    "add_arguments",
    "main",
]

# fields every record gains (original fields are kept as they are)
ADDED_FIELDS = (
    "masked_text",
    "rephrased_text",
    "rephrased",
    "toxicity_before",
    "toxicity_after",
    "rephrase_status",
    "rephrase_truncated",
    "rephrase_error",
)

_CACHE_VERSION = 1  # bump when the algorithm or the cached record layout changes


class RephraseError(ValueError):
    """Bad input or setup for rephrasing; the message says what to do."""


# --------------------------------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EngineOutput:
    """What an engine returns for one sentence.

    Attributes:
        masked: the sentence with the high-scoring tokens replaced by the mask token.
        rephrased: the rewritten sentence (equal to the engine's input when nothing was masked).
        truncated: the text was longer than the models' context and was cut to fit.
        error: why the sentence could not be processed (then ``rephrased`` is its input), else `None`.
        min_gap: smallest top-2 logit gap over the filled positions (batched engine only; near-ties show here).
        min_margin: smallest ``|score - mask_threshold|`` over the tokens (batched engine only).
        changed: ``rephrased`` differs from the engine's (prepared) input.
    """

    masked: str
    rephrased: str
    changed: bool = False
    truncated: bool = False
    error: str | None = None
    min_gap: float = math.inf
    min_margin: float = math.inf


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu`` / ``cuda`` as given (RephraseError otherwise)."""
    from detox_sft.devices import resolve_device as _resolve

    return _resolve(device, "rephrase.device", RephraseError)


class TMaRCoEngine:
    """Common part of both engines: input preparation (context limit, literal mask tokens) and the settings.

    Subclasses implement ``_run(texts) -> list[EngineOutput]`` on prepared texts.
    """

    name = "base"

    def __init__(self, tokenizer: Any, max_positions: int, cfg: RephraseConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        # a scoring variant holds every token plus "<pad><mask>" plus <s> and </s>; re-tokenizing a masked string can
        # add a token or two: keep a margin so no input ever exceeds the position embeddings
        self.max_tokens = max(1, max_positions - 6)
        self.calls = 0  # sentences processed (tests count them to prove the cache works)
        # seconds spent in each step over the engine's life: "score" (every token masked in turn, read by both
        # experts) and "rephrase" (mask + fill); the benchmark reads them to say where the time goes
        self.timings = {"score": 0.0, "rephrase": 0.0}

    def prepare(self, text: str) -> tuple[str, bool]:
        """Make ``text`` safe for TMaRCo: break literal mask tokens, cut to the context. Returns (text, truncated)."""
        tok = self.tokenizer
        # a literal "<mask>" in the data would give a sentence two masks, which TMaRCo cannot handle (it crashes)
        text = text.replace(tok.mask_token, tok.mask_token[:1] + " " + tok.mask_token[1:])
        tokens = tok.tokenize(text)
        if len(tokens) <= self.max_tokens:
            return text, False
        return tok.convert_tokens_to_string(tokens[: self.max_tokens]), True

    def rephrase(self, texts: Sequence[str]) -> list[EngineOutput]:
        """Score, mask and rephrase ``texts`` (strings); returns one :class:`EngineOutput` per text, in order."""
        prepared = [self.prepare(t) for t in texts]
        self.calls += len(texts)
        outs = self._run([p for p, _ in prepared]) if prepared else []
        for out, (text, truncated) in zip(outs, prepared, strict=True):
            out.truncated = truncated
            out.changed = out.error is None and out.rephrased != text
        return outs

    def _run(self, texts: list[str]) -> list[EngineOutput]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change an engine's output (part of the cache key)."""
        return _settings(self.cfg, self.name, "float32")


class ReferenceEngine(TMaRCoEngine):
    """TrustyAI's own TMaRCo: ``score`` -> ``mask`` -> ``rephrase``, called exactly as its documentation shows."""

    name = "trustyai"

    def __init__(self, tmarco: Any, cfg: RephraseConfig):
        super().__init__(tmarco.tokenizer, _max_positions([tmarco.base, *tmarco.experts]), cfg)
        self.tmarco = tmarco

    def _run_batch(self, texts: list[str]) -> list[EngineOutput]:
        thr = float(self.cfg.mask_threshold)
        start = time.perf_counter()
        scores = self.tmarco.score(texts)
        scored = time.perf_counter()
        self.timings["score"] += scored - start
        masked = self.tmarco.mask(texts, threshold=thr, scores=scores)
        # rephrase's positional order differs from mask's: keywords only; its `threshold` is the "anything masked?"
        # test, so it must be the mask threshold too
        rephrased = self.tmarco.rephrase(
            texts,
            scores=scores,
            masked_outputs=masked,
            combine_original=bool(self.cfg.combine_original),
            expert_weights=list(self.cfg.expert_weights),
            threshold=thr,
        )
        self.timings["rephrase"] += time.perf_counter() - scored
        return [EngineOutput(m, r) for m, r in zip(masked, rephrased, strict=True)]

    def _run(self, texts: list[str]) -> list[EngineOutput]:
        try:
            return self._run_batch(texts)
        except Exception:  # noqa: BLE001 - TMaRCo fails a whole list for one bad sentence: isolate it
            outs = []
            for text in texts:
                try:
                    outs.extend(self._run_batch([text]))
                except Exception as exc:  # noqa: BLE001
                    outs.append(EngineOutput(text, text, error=f"trustyai TMaRCo failed: {type(exc).__name__}: {exc}"))
            return outs


def _max_positions(models: Sequence[Any]) -> int:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else 1024


class BatchedEngine(TMaRCoEngine):
    """TMaRCo's algorithm over many sentences at once (see the module docstring).

    Reproduces trustyai 0.6.4's ``TMaRCo.score`` / ``mask`` / ``rephrase`` (use_logits, normalize,
    conditional) including its tokenization: every string it builds is built with the same tokenizer calls
    (``tokenize``, ``convert_tokens_to_string``, re-tokenization with ``<s>``/``</s>``), so the models see the same
    token ids; only the batching differs. Model calls compute the encoder, the decoder up to the last position
    needed, and the LM head only at the positions whose logits are used.

    Args:
        tokenizer: TMaRCo's tokenizer (pad token = EOS, ``add_prefix_space=True``).
        base: the BART base model; experts: ``[anti_expert, expert]`` in the order of ``cfg.expert_weights``.
        cfg: the recipe's rephrase section.
        device: ``cpu`` or ``cuda``; dtype: `None` = float16 on CUDA, float32 on CPU.
        max_batch_tokens: padded tokens per forward pass.
    """

    name = "batched"

    def __init__(
        self,
        tokenizer: Any,
        base: Any,
        experts: Sequence[Any],
        cfg: RephraseConfig,
        device: str = "cpu",
        dtype: Any = None,
        max_batch_tokens: int | None = None,
    ):
        import torch

        super().__init__(tokenizer, _max_positions([base, *experts]), cfg)
        self.device = device
        self.dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        self.base = base.to(device=device, dtype=self.dtype).eval()
        self.experts = [m.to(device=device, dtype=self.dtype).eval() for m in experts]
        if len(self.experts) != len(cfg.expert_weights):
            raise RephraseError(
                f"{len(self.experts)} experts but {len(cfg.expert_weights)} expert_weights. "
                "Fix: give one weight per expert: [anti_expert_weight, expert_weight]."
            )
        self.max_batch_tokens = max_batch_tokens or (65536 if device == "cuda" else 8192)
        # what one encoder or decoder call costs, in token positions (see _cheapest_split): on CPU measured for the
        # decoder, ~70 at bart-base size and ~200 for the zoo's d=128 BART; on CUDA a call is dozens of kernel launches
        # while positions are nearly free
        self.call_tokens = 4096 if device == "cuda" else 128
        # on CPU the experts run at once, each on its share of torch's threads (see _experts_logits_at)
        self.concurrent_models = device == "cpu"

    @classmethod
    def from_tmarco(cls, tmarco: Any, cfg: RephraseConfig, **kwargs: Any) -> BatchedEngine:
        """Share a TMaRCo's tokenizer and models (no copy: on CPU float32 both engines can use the same weights)."""
        return cls(tmarco.tokenizer, tmarco.base, tmarco.experts, cfg, **kwargs)

    def fingerprint(self) -> dict[str, Any]:
        return _settings(self.cfg, self.name, str(self.dtype).replace("torch.", ""))

    # -- model calls ------------------------------------------------------------------------------------------------

    def _experts_logits_at(self, rows: Sequence[Sequence[int]], queries: Sequence[tuple[int, int]]) -> list[Any]:
        """:meth:`_logits_at` of each expert, in order; on CPU the experts run at once, each on its share of threads.

        At the zoo's size a model call is mostly per-operator overhead, which a second thread overlaps: the two experts'
        scoring logits for 100 zoo sentences took 0.45 s one after the other on 2 threads and 0.32 s side by side on
        one thread each (2-core EPYC), bit-identical. torch's thread count is process-wide: it is lowered for the
        duration of the calls and restored after.
        """
        import torch

        threads = torch.get_num_threads()
        experts = self.experts
        if not self.concurrent_models or len(experts) < 2 or threads < len(experts):
            return [self._logits_at(model, rows, queries) for model in experts]
        from concurrent.futures import ThreadPoolExecutor

        torch.set_num_threads(threads // len(experts))
        try:
            with ThreadPoolExecutor(max_workers=len(experts)) as pool:
                return list(pool.map(lambda model: self._logits_at(model, rows, queries), experts))
        finally:
            torch.set_num_threads(threads)

    def _logits_at(self, model: Any, rows: Sequence[Sequence[int]], queries: Sequence[tuple[int, int]]) -> Any:
        """Logits (float32, [len(queries), V]) of ``model`` at (row, position) for token-id rows, batched."""
        import torch

        out = None
        by_row: dict[int, list[int]] = {}
        for qi, (row, _) in enumerate(queries):
            by_row.setdefault(row, []).append(qi)
        order = sorted(by_row, key=lambda r: len(rows[r]))  # length-sorted: little padding
        pad = self.tokenizer.pad_token_id
        # chunks of rows of similar length: padding costs arithmetic, each call costs overhead
        for start, end in _cheapest_split([len(rows[r]) for r in order], self.call_tokens, self.max_batch_tokens):
            chunk = order[start:end]
            width = len(rows[chunk[-1]])
            ids = torch.tensor([list(rows[r]) + [pad] * (width - len(rows[r])) for r in chunk], dtype=torch.long)
            attn = torch.tensor([[1] * len(rows[r]) + [0] * (width - len(rows[r])) for r in chunk], dtype=torch.long)
            q_index = [qi for r in chunk for qi in by_row[r]]
            q_row = torch.tensor([i for i, r in enumerate(chunk) for _ in by_row[r]], dtype=torch.long)
            q_pos = torch.tensor([queries[qi][1] for qi in q_index], dtype=torch.long)
            logits = self._forward_at(model, ids.to(self.device), attn.to(self.device), q_row, q_pos)
            if out is None:
                out = torch.empty((len(queries), logits.shape[-1]), dtype=torch.float32, device=logits.device)
            out[torch.tensor(q_index, device=logits.device)] = logits.float()
        return out

    def _forward_at(self, model: Any, ids: Any, attn: Any, q_row: Any, q_pos: Any) -> Any:
        import torch

        with torch.inference_mode():
            core = getattr(model, "model", None)
            if model.config.model_type in ("bart", "mbart") and hasattr(model, "final_logits_bias") and core:
                from transformers.models.bart.modeling_bart import shift_tokens_right

                # what BartForConditionalGeneration.forward does, minus the decoder positions after the last one
                # asked for (the decoder is causal: they cannot change earlier ones) and the LM head elsewhere
                enc = core.encoder(input_ids=ids, attention_mask=attn).last_hidden_state
                dec_ids = shift_tokens_right(ids, core.config.pad_token_id, core.config.decoder_start_token_id)
                picked = torch.empty((len(q_row), enc.shape[-1]), dtype=enc.dtype, device=enc.device)
                # rows grouped by the last position they need: the decoder is causal, so each group stops there
                # (a single cut for the whole chunk decoded about twice the positions that are read)
                for rows, queries, local, cut in _decoder_groups(
                    q_row, q_pos, self.call_tokens, self.max_batch_tokens, enc.device
                ):
                    hidden = core.decoder(
                        input_ids=dec_ids[rows, :cut],
                        encoder_hidden_states=enc[rows],
                        encoder_attention_mask=attn[rows],
                        use_cache=False,
                    ).last_hidden_state
                    picked[queries] = hidden[local, q_pos.to(enc.device)[queries]]
                return model.lm_head(picked) + model.final_logits_bias[0].to(picked.device)
            logits = model(input_ids=ids, attention_mask=attn).logits
            return logits[q_row.to(logits.device), q_pos.to(logits.device)]

    # -- TMaRCo.score ------------------------------------------------------------------------------------------------

    def _mask_variants(self, sentence: str) -> list[str]:
        # TMaRCo.mask_tokens(sentence, pad_token + mask_token)
        tok = self.tokenizer
        tokens = tok.tokenize(sentence)
        mask = tok.pad_token + tok.mask_token
        variants = []
        for idx in range(len(tokens)):
            masked = tokens.copy()
            masked[idx] = mask
            variants.append(tok.convert_tokens_to_string(masked))
        return variants

    def score(self, texts: Sequence[str]) -> tuple[list[Any], list[str | None]]:
        """TMaRCo.score for many sentences at once. Returns (scores per sentence, error per sentence)."""
        import torch

        tok = self.tokenizer
        mask_id = tok.mask_token_id  # a property lookup each time: read it once
        errors: list[str | None] = [None] * len(texts)
        variants: list[str] = []
        variant_owner: list[int] = []
        for si, sentence in enumerate(texts):
            for variant in self._mask_variants(sentence):
                variants.append(variant)
                variant_owner.append(si)
        # one tokenizer call for every variant of every sentence (each string is encoded on its own, unpadded: the
        # ids equal TMaRCo's per-sentence call)
        all_ids = tok(variants)["input_ids"] if variants else []
        owner: list[int] = []
        rows: list[list[int]] = []
        positions: list[int] = []
        found: list[int | None] = []
        for row in all_ids:
            hits = [i for i, t in enumerate(row) if t == mask_id]
            found.append(hits[0] if len(hits) == 1 else None)
        for k, si in enumerate(variant_owner):
            if found[k] is None:
                errors[si] = "a masked variant does not hold exactly one mask token"
        for k, si in enumerate(variant_owner):
            if errors[si] is None:
                owner.append(si)
                rows.append(all_ids[k])
                positions.append(found[k])
        scores: list[Any] = [[] for _ in texts]
        if not rows:
            return scores, errors
        queries = [(i, p) for i, p in enumerate(positions)]
        distributions = [torch.softmax(logits, dim=1) for logits in self._experts_logits_at(rows, queries)]
        js_rows = self._js_pairs(distributions)  # one array [n_rows] per expert pair
        # rows are in sentence order: each sentence's rows are one slice
        sentence_ids, first = np.unique(np.asarray(owner), return_index=True)
        bounds = {
            int(si): (int(a), int(b)) for si, a, b in zip(sentence_ids, first, [*first[1:], len(owner)], strict=True)
        }
        for si, (a, b) in bounds.items():
            js_distances = []
            for js in js_rows:
                js_distance = js[a:b]
                js_distance = js_distance / np.average(js_distance)  # normalize=True
                js_distances.append(js_distance)
            scores[si] = np.average(js_distances, axis=0)
        return scores, errors

    def _js_pairs(self, distributions: list[Any]) -> list[np.ndarray]:
        import itertools

        out = []
        for p, q in itertools.combinations(distributions, 2):
            if p.device.type == "cpu":
                # scipy, as TMaRCo does, in row chunks (the function is row-wise, so chunking changes no bit) spread
                # over torch's threads: numpy and scipy's ufuncs release the GIL
                from concurrent.futures import ThreadPoolExecutor

                import torch
                from scipy.spatial.distance import jensenshannon

                chunks = [(p[i : i + 128].numpy(), q[i : i + 128].numpy()) for i in range(0, p.shape[0], 128)]
                with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
                    parts = list(pool.map(lambda pq: jensenshannon(pq[0], pq[1], axis=1), chunks))
                out.append(np.concatenate(parts))
            else:
                out.append(_jensenshannon_torch(p, q).cpu().numpy())
        return out

    # -- TMaRCo.mask -------------------------------------------------------------------------------------------------

    def mask(self, texts: Sequence[str], scores: Sequence[Any], threshold: float) -> list[str]:
        """TMaRCo.mask with precomputed scores."""
        tok = self.tokenizer
        masked_sentences = []
        for s_idx, sentence in enumerate(texts):
            tokens = tok.tokenize(sentence)
            masked_output = []
            for idx in range(len(tokens)):
                if scores[s_idx][idx] > threshold:
                    masked_output.append(tok.mask_token)
                else:
                    masked_output.append(tokens[idx])
            masked_sentences.append(tok.convert_tokens_to_string(masked_output))
        return masked_sentences

    # -- TMaRCo.rephrase ---------------------------------------------------------------------------------------------

    def fill(
        self, texts: Sequence[str], scores: Sequence[Any], masked: Sequence[str], threshold: float
    ) -> tuple[list[str], list[str | None], list[float]]:
        """TMaRCo.rephrase (conditional, combine_original from cfg) for many sentences, masks filled in lockstep.

        Returns (rephrased texts, error per sentence, smallest top-2 logit gap per sentence).
        """
        tok = self.tokenizer
        weights = [float(w) for w in self.cfg.expert_weights]
        combine = bool(self.cfg.combine_original)
        out = list(texts)
        errors: list[str | None] = [None] * len(texts)
        gaps = [math.inf] * len(texts)

        jobs = []  # [sentence index, masked tokens, original inner ids, rephrased ids, cursor]
        base_rows: list[list[int]] = []
        base_queries: list[tuple[int, int]] = []
        base_query_of: dict[tuple[int, int], int] = {}
        for i, original in enumerate(texts):
            if len(original.strip()) == 0 or max(scores[i]) <= threshold:
                continue  # TMaRCo passes these through unchanged
            original_ids = tok(original)["input_ids"]
            mtoks = tok.tokenize(masked[i])
            mask_idx = [idx for idx, t in enumerate(mtoks) if t == tok.mask_token]
            row = len(base_rows)
            base_rows.append(original_ids)
            for idx in mask_idx:
                base_query_of[(i, idx)] = len(base_queries)
                # TMaRCo reads the base logits at 1 + idx of the *original* encoding; re-tokenizing a masked string
                # can add tokens (byte pieces of emoji / CJK), and there TMaRCo raises IndexError. We read the last
                # position instead: a documented deviation, only where the reference fails.
                base_queries.append((row, min(1 + idx, len(original_ids) - 1)))
            jobs.append([i, mtoks, original_ids[1:-1], [], 0])
        if not jobs:
            return out, errors, gaps
        base_logits = self._logits_at(self.base, base_rows, base_queries)

        mask_token, mask_id = tok.mask_token, tok.mask_token_id  # properties: read once
        active = jobs
        while active:
            stepping = []  # (job, expert input string)
            for job in active:
                i, mtoks, original_inner, ids, idx = job
                start = idx
                while idx < len(mtoks) and mtoks[idx] != mask_token:
                    idx += 1
                ids.extend(tok.convert_tokens_to_ids(mtoks[start:idx]))
                job[4] = idx
                if idx == len(mtoks):
                    continue
                current = ids + [mask_id]
                if combine and idx < len(mtoks) - 2:
                    current = current + original_inner[idx + 1 :]
                stepping.append((job, tok.convert_tokens_to_string(tok.convert_ids_to_tokens(current))))
            # one tokenizer call per step for all sentences (each string encoded on its own, as TMaRCo does)
            encoded = tok([sequence for _, sequence in stepping])["input_ids"] if stepping else []
            pending = []  # (job, expert input ids, mask position)
            still = []
            for (job, _), seq_ids in zip(stepping, encoded, strict=True):
                hits = [p for p, t in enumerate(seq_ids) if t == mask_id]
                if len(hits) != 1:
                    errors[job[0]] = "an expert input does not hold exactly one mask token"
                    continue
                pending.append((job, seq_ids, hits[0]))
                still.append(job)
            if not pending:
                break
            rows = [p[1] for p in pending]
            queries = [(r, p[2]) for r, p in enumerate(pending)]
            combined = base_logits[[base_query_of[(p[0][0], p[0][4])] for p in pending]].clone()
            for w, logits in zip(weights, self._experts_logits_at(rows, queries), strict=True):
                # TMaRCo: next_token_logits += weight * expert_logits (float32, same order)
                combined += w * logits
            values = combined.cpu().numpy()
            chosen = values.argmax(axis=1)  # np.argmax, as TMaRCo: first index on ties
            top2 = np.partition(values, -2, axis=1)[:, -2:] if values.shape[1] > 1 else None
            for k, (job, _, _) in enumerate(pending):
                job[3].append(int(chosen[k]))
                job[4] += 1
                if top2 is not None:
                    gaps[job[0]] = min(gaps[job[0]], float(top2[k, 1] - top2[k, 0]))
            active = [job for job in still if errors[job[0]] is None]

        for i, _, _, ids, _ in jobs:
            if errors[i] is None:
                out[i] = tok.decode(ids, clean_up_tokenization_spaces=True, skip_special_tokens=True)
        return out, errors, gaps

    def _run(self, texts: list[str]) -> list[EngineOutput]:
        thr = float(self.cfg.mask_threshold)
        start = time.perf_counter()
        scores, score_errors = self.score(texts)
        scored = time.perf_counter()
        self.timings["score"] += scored - start
        masked = self.mask(texts, scores, thr)
        ok = [i for i in range(len(texts)) if score_errors[i] is None]
        rephrased, fill_errors, gaps = self.fill(
            [texts[i] for i in ok], [scores[i] for i in ok], [masked[i] for i in ok], thr
        )
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()  # the step's kernels belong to the step
        self.timings["rephrase"] += time.perf_counter() - scored
        outs = [EngineOutput(t, t, error=e) for t, e in zip(texts, score_errors, strict=True)]
        for k, i in enumerate(ok):
            if fill_errors[k] is not None:
                outs[i] = EngineOutput(texts[i], texts[i], error=fill_errors[k])
                continue
            outs[i] = EngineOutput(masked[i], rephrased[k], min_gap=gaps[k])
            if len(scores[i]):
                outs[i].min_margin = float(np.min(np.abs(np.asarray(scores[i], dtype=np.float64) - thr)))
        return outs


def _cheapest_split(sizes: Sequence[int], call_tokens: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut rows sorted by size (ascending) into consecutive calls ``[start, end)``, each padded to its last row.

    Minimises the estimated time ``sum(call_tokens + rows * size of the call's last row)``: one model call costs about
    as much as ``call_tokens`` token positions, so small models get few large calls and large ones pay little padding.
    No call holds more than ``max_tokens`` positions (``rows * size``) unless one row alone does.
    """
    if not sizes:
        return []
    values, counts = np.unique(np.asarray(sizes), return_counts=True)
    before = np.concatenate([[0], np.cumsum(counts)])  # rows before distinct size k
    # best[j]: least cost of the rows of sizes values[:j]; a call of sizes i..j-1 pads to values[j-1]
    best = np.zeros(len(values) + 1)
    start_of = np.zeros(len(values) + 1, dtype=int)
    for j in range(1, len(values) + 1):
        rows_in = before[j] - before[:j]  # rows of sizes i..j-1 for every i < j
        per_call = max(1, max_tokens // int(values[j - 1]))  # rows one call may hold at this size
        cost = best[:j] + -(-rows_in // per_call) * call_tokens + rows_in * int(values[j - 1])
        start_of[j] = int(np.argmin(cost))
        best[j] = cost[start_of[j]]
    calls: list[tuple[int, int]] = []
    j = len(values)
    while j > 0:
        i = start_of[j]
        per_call = max(1, max_tokens // int(values[j - 1]))
        calls[:0] = [(k, min(k + per_call, int(before[j]))) for k in range(int(before[i]), int(before[j]), per_call)]
        j = i
    return calls


def _decoder_groups(
    q_row: Any, q_pos: Any, call_tokens: int, max_tokens: int, device: Any
) -> list[tuple[Any, Any, Any, int]]:
    """Split a chunk's rows into decoder calls that each stop at the last position one of their rows needs.

    Rows are sorted by the positions they need and cut by :func:`_cheapest_split` (the decoder is causal: a row's
    later positions cannot change the ones it reads).

    Returns ``(rows, queries, local rows of the queries, cut)`` per group, as index tensors on ``device``; ``cut`` is
    one past the last position any query of the group reads.
    """
    import torch

    q_row_list, q_pos_list = q_row.tolist(), q_pos.tolist()
    need: dict[int, int] = {}
    for r, p in zip(q_row_list, q_pos_list, strict=True):
        need[r] = max(need.get(r, -1), p)
    ordered = sorted(need, key=lambda r: (need[r], r))
    groups = [ordered[a:b] for a, b in _cheapest_split([need[r] + 1 for r in ordered], call_tokens, max_tokens)]
    slot = {r: (g, k) for g, rows in enumerate(groups) for k, r in enumerate(rows)}
    queries: list[list[int]] = [[] for _ in groups]
    for qi, r in enumerate(q_row_list):
        queries[slot[r][0]].append(qi)

    def index(values: list[int]) -> Any:
        return torch.tensor(values, dtype=torch.long, device=device)

    return [
        (index(rows), index(qs), index([slot[q_row_list[qi]][1] for qi in qs]), need[rows[-1]] + 1)
        for rows, qs in zip(groups, queries, strict=True)
    ]


def _jensenshannon_torch(p: Any, q: Any) -> Any:
    """scipy.spatial.distance.jensenshannon(p, q, axis=1) in torch (float32, for GPU batches)."""
    import torch

    p = p / p.sum(dim=1, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True)
    m = (p + q) / 2.0

    def rel_entr(x: Any, y: Any) -> Any:
        safe = (x > 0) & (y > 0)
        val = torch.where(safe, x * torch.log(torch.where(safe, x / y, torch.ones_like(x))), torch.zeros_like(x))
        return torch.where(
            (x == 0) & (y >= 0), torch.zeros_like(x), torch.where(safe, val, torch.full_like(x, math.inf))
        )

    js = rel_entr(p, m).sum(dim=1) + rel_entr(q, m).sum(dim=1)
    return torch.sqrt(js / 2.0)


def load_engine(cfg: RephraseConfig, engine: str | None = None, device: str | None = None) -> TMaRCoEngine:
    """Load the models of ``cfg`` and build an engine (``batched`` or ``trustyai``; default ``cfg.engine``).

    Raises:
        OSError: a model cannot be loaded (the message says what to do).
    """
    from detox_sft.compat import load_tmarco

    name = engine or cfg.engine
    if name not in ("batched", "trustyai"):
        raise RephraseError(f"unknown engine {name!r}. Fix: use 'batched' or 'trustyai'.")
    device = resolve_device(device or cfg.device)
    tmarco = load_tmarco(
        cfg.base_model, cfg.expert, cfg.anti_expert, device=device, expert_weights=list(cfg.expert_weights)
    )
    if name == "trustyai":
        return ReferenceEngine(tmarco, cfg)
    return BatchedEngine.from_tmarco(tmarco, cfg, device=device)


# --------------------------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------------------------


def _model_dir(ref: str) -> Path | None:
    path = Path(resolve_ref(ref))
    if path.is_dir():
        return path
    with contextlib.suppress(Exception):  # a hub id: its snapshot directory in the local HF cache, if any
        from transformers.utils import cached_file

        found = cached_file(ref, "config.json", _raise_exceptions_for_missing_entries=False)
        if found:
            return Path(found).parent
    return None


def models_fingerprint(cfg: RephraseConfig) -> dict[str, Any]:
    """Identity of the base / expert / anti-expert models without loading them: config bytes + weight file stats.

    A hub id not in the local cache is identified by its name only.
    """
    out = {}
    for role, ref in (("base", cfg.base_model), ("expert", cfg.expert), ("anti_expert", cfg.anti_expert)):
        path = _model_dir(ref)
        if path is None:
            out[role] = {"ref": ref}
            continue
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            file = path / name
            if not file.is_file():
                continue
            if name.endswith((".json", ".txt", ".model")):
                digest.update(name.encode() + b"\0" + file.read_bytes())
            elif name.endswith((".safetensors", ".bin", ".pt")):
                st = file.stat()
                digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        out[role] = {"ref": ref, "files": digest.hexdigest()}
    return out


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class _Cache:
    """SQLite cache: toxicity per (scorer, text) and engine output per (engine settings, text). Commits per batch."""

    def __init__(self, directory: Path | None):
        self.conn = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(directory / "rephrase.sqlite", timeout=60)
        self.conn.execute("CREATE TABLE IF NOT EXISTS tox (k TEXT PRIMARY KEY, v REAL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS out (k TEXT PRIMARY KEY, v TEXT)")
        self.conn.commit()

    def get_many(self, table: str, keys: Sequence[str]) -> dict[str, Any]:
        if self.conn is None or not keys:
            return {}
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            part = list(keys[i : i + 500])
            marks = ",".join("?" * len(part))
            for k, v in self.conn.execute(f"SELECT k, v FROM {table} WHERE k IN ({marks})", part):  # noqa: S608
                found[k] = json.loads(v) if table == "out" else v
        return found

    def put_many(self, table: str, items: dict[str, Any]) -> None:
        if self.conn is None or not items:
            return
        rows = [(k, json.dumps(v, ensure_ascii=False) if table == "out" else v) for k, v in items.items()]
        self.conn.executemany(f"INSERT OR REPLACE INTO {table} (k, v) VALUES (?, ?)", rows)  # noqa: S608
        self.conn.commit()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# --------------------------------------------------------------------------------------------------------------------
# dataset level
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RephraseSummary:
    """Counts and means of one rephrasing run.

    Attributes:
        total: records in; missing: field absent or null; empty: empty or whitespace-only text.
        scored: texts scored for gating; gated: records at or above the gate (sent to TMaRCo).
        rephrased: gated records whose text TMaRCo changed; unchanged: gated but nothing masked or changed.
        truncated: texts cut to the models' context; errors: texts TMaRCo could not process (kept unchanged).
        computed: distinct texts the engine processed in this run; cached: distinct gated texts read from the cache.
        gate_threshold, mask_threshold, engine: the settings used.
        mean_toxicity_before / mean_toxicity_after: over the scored records; gated_* over the gated ones.
        seconds: wall time.
    """

    total: int = 0
    missing: int = 0
    empty: int = 0
    scored: int = 0
    gated: int = 0
    rephrased: int = 0
    unchanged: int = 0
    truncated: int = 0
    errors: int = 0
    computed: int = 0
    cached: int = 0
    gate_threshold: float = 0.0
    mask_threshold: float = 0.0
    engine: str = ""
    mean_toxicity_before: float | None = None
    mean_toxicity_after: float | None = None
    gated_toxicity_before: float | None = None
    gated_toxicity_after: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


@dataclass
class RephraseResult:
    """Records (original fields + :data:`ADDED_FIELDS`, input order) and the run's :class:`RephraseSummary`."""

    records: list[dict[str, Any]]
    summary: RephraseSummary
    field: str = "text"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dataset(self) -> Any:
        """The records as a :class:`datasets.Dataset`."""
        from datasets import Dataset

        return Dataset.from_list(self.records)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of objects (blank lines skipped).

    Raises:
        RephraseError: a line is not valid JSON or not an object; the message gives the line number.
    """
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RephraseError(
                    f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Fix: one JSON object per line."
                ) from exc
            if not isinstance(value, dict):
                raise RephraseError(
                    f"{path}: line {number} is a JSON {type(value).__name__}, not an object. "
                    "Fix: one JSON object per line."
                )
            records.append(value)
    return records


def write_jsonl_atomic(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSONL through a temporary file in the same directory and a rename: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _as_records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, str | os.PathLike):
        return read_jsonl(data)
    if hasattr(data, "keys") and "train" in data and not isinstance(data, dict):  # a DatasetDict
        raise RephraseError("got a DatasetDict. Fix: pass one split, e.g. dataset['train'].")
    if hasattr(data, "to_list"):
        return data.to_list()
    records = list(data)
    if any(not isinstance(r, dict) for r in records):
        raise RephraseError("records must be dicts (or give a datasets.Dataset or a JSONL path).")
    return [dict(r) for r in records]


def _score_cached(
    texts: Sequence[str],
    scorer: Callable[[Sequence[str]], np.ndarray],
    scorer_key: str,
    cache: _Cache,
    progress: bool,
    desc: str,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(texts))
    keys = {t: _key([scorer_key, t]) for t in unique}
    found = cache.get_many("tox", list(keys.values()))
    result = {t: float(found[k]) for t, k in keys.items() if k in found}
    todo = [t for t in unique if t not in result]
    step = 256
    with tqdm(total=len(todo), desc=desc, unit="text", disable=not progress or not todo) as bar:
        for i in range(0, len(todo), step):
            part = todo[i : i + step]
            values = np.asarray(scorer(part), dtype=np.float64)
            fresh = {t: float(v) for t, v in zip(part, values, strict=True)}
            cache.put_many("tox", {keys[t]: v for t, v in fresh.items()})
            result.update(fresh)
            bar.update(len(part))
    return result


def rephrase_dataset(
    dataset_or_records: Any,
    cfg: RephraseConfig,
    field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    engine: TMaRCoEngine | str | None = None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
    device: str | None = None,
) -> RephraseResult:
    """Gate, mask and rephrase the ``field`` of every record; cached and resumable.

    Every record comes back in input order with its original fields unchanged plus :data:`ADDED_FIELDS`:
    ``masked_text`` (`None` unless gated), ``rephrased_text`` (the original when not rephrased), ``rephrased``
    (bool), ``toxicity_before`` / ``toxicity_after`` (`None` for a missing field) and ``rephrase_status``
    (``rephrased``, ``unchanged``, ``below_gate``, ``empty``, ``missing``, ``error``), ``rephrase_truncated``
    (the text was cut to the models' context; a warning is issued) and ``rephrase_error`` (why TMaRCo failed).

    Args:
        dataset_or_records: a :class:`datasets.Dataset`, a JSONL path, or a list of dicts.
        cfg: the recipe's rephrase section (gate and mask thresholds, models, weights, engine, batch size).
        field: the text field.
        cache_dir: SQLite cache directory (`None`: no cache). Use ``<run>/rephrase/cache``.
        progress: show tqdm progress bars.
        engine: an engine object (its own thresholds / weights apply), an engine name, or `None` for
            ``cfg.engine`` (models load only when some text is not cached).
        scorer: a toxicity scorer; `None` loads ``cfg.scorer``.
        device: overrides ``cfg.device``.

    Raises:
        RephraseError: unreadable input (e.g. a malformed JSONL line: its number is in the message).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    records = _as_records(dataset_or_records)
    cache = _Cache(Path(cache_dir) if cache_dir is not None else None)
    try:
        if scorer is None:
            from detox_sft.toxicity import load_scorer

            scorer = load_scorer(cfg.scorer, device=resolve_device(device or cfg.device), batch_size=cfg.batch_size)
        scorer_key = json.dumps({"scorer": cfg.scorer, "name": getattr(scorer, "name", None), "v": _CACHE_VERSION})
        texts: list[str | None] = []
        for record in records:
            value = record.get(field)
            texts.append(value if isinstance(value, str) else None if value is None else str(value))
        present = [t for t in texts if t is not None]
        summary = RephraseSummary(
            total=len(records), gate_threshold=float(cfg.gate_threshold), mask_threshold=float(cfg.mask_threshold)
        )
        tox = _score_cached(present, scorer, scorer_key, cache, progress, "toxicity (gate)")
        gated = list(dict.fromkeys(t for t in present if t.strip() and tox[t] >= cfg.gate_threshold))

        # engine outputs: cached ones first; the engine (and its models) only for the rest
        engine_name = engine if isinstance(engine, str) else (engine.name if engine is not None else cfg.engine)
        device = resolve_device(device or cfg.device)
        engine_key = _engine_key(cfg, engine if _is_engine(engine) else None, engine_name, device)
        keys = {t: _key([engine_key, t]) for t in gated}
        found = cache.get_many("out", list(keys.values()))
        outputs: dict[str, dict[str, Any]] = {t: found[k] for t, k in keys.items() if k in found}
        todo = [t for t in gated if t not in outputs]
        summary.cached = len(gated) - len(todo)
        summary.computed = len(todo)
        if todo:
            if not _is_engine(engine):
                engine = load_engine(cfg, engine_name, device)
            summary.engine = engine.name
            with tqdm(total=len(todo), desc=f"rephrase ({engine.name})", unit="text", disable=not progress) as bar:
                for i in range(0, len(todo), cfg.batch_size):
                    part = todo[i : i + cfg.batch_size]
                    fresh = {t: asdict(o) for t, o in zip(part, engine.rephrase(part), strict=True)}
                    for value in fresh.values():  # JSON has no infinity
                        value["min_gap"] = None if math.isinf(value["min_gap"]) else value["min_gap"]
                        value["min_margin"] = None if math.isinf(value["min_margin"]) else value["min_margin"]
                    cache.put_many("out", {keys[t]: v for t, v in fresh.items()})  # committed: resumable
                    outputs.update(fresh)
                    bar.update(len(part))
        summary.engine = summary.engine or engine_name
        changed = [outputs[t]["rephrased"] for t in gated if outputs[t]["changed"]]
        tox_after = _score_cached(changed, scorer, scorer_key, cache, progress, "toxicity (after)")
    finally:
        cache.close()

    out_records = []
    truncated_texts = 0
    for record, text in zip(records, texts, strict=True):
        new = dict(record)
        new.update(
            {
                "masked_text": None,
                "rephrased_text": text,
                "rephrased": False,
                "toxicity_before": None,
                "toxicity_after": None,
                "rephrase_status": None,
                "rephrase_truncated": False,
                "rephrase_error": None,
            }
        )
        if text is None:
            new["rephrase_status"] = "missing"
            summary.missing += 1
        else:
            before = tox[text]
            new["toxicity_before"] = new["toxicity_after"] = before
            summary.scored += 1
            if not text.strip():
                new["rephrase_status"] = "empty"
                summary.empty += 1
            elif before < cfg.gate_threshold:
                new["rephrase_status"] = "below_gate"
            else:
                summary.gated += 1
                result = outputs[text]
                new["masked_text"] = result["masked"]
                if result.get("truncated"):
                    new["rephrase_truncated"] = True
                    summary.truncated += 1
                    truncated_texts += 1
                if result.get("error"):
                    new["rephrase_status"] = "error"
                    new["rephrase_error"] = result["error"]
                    summary.errors += 1
                elif result["changed"]:
                    new.update(
                        rephrased_text=result["rephrased"],
                        rephrased=True,
                        rephrase_status="rephrased",
                        toxicity_after=tox_after[result["rephrased"]],
                    )
                    summary.rephrased += 1
                else:
                    new["rephrase_status"] = "unchanged"
                    summary.unchanged += 1
        out_records.append(new)
    if truncated_texts:
        warnings.warn(
            f"{truncated_texts} text(s) were longer than the TMaRCo models' context and were truncated "
            "before rephrasing (see rephrase_truncated in the records).",
            stacklevel=2,
        )
    befores = [r["toxicity_before"] for r in out_records if r["toxicity_before"] is not None]
    afters = [r["toxicity_after"] for r in out_records if r["toxicity_after"] is not None]
    g_before = [r["toxicity_before"] for r in out_records if r["rephrase_status"] in ("rephrased", "unchanged")]
    g_after = [r["toxicity_after"] for r in out_records if r["rephrase_status"] in ("rephrased", "unchanged")]
    summary.mean_toxicity_before = float(np.mean(befores)) if befores else None
    summary.mean_toxicity_after = float(np.mean(afters)) if afters else None
    summary.gated_toxicity_before = float(np.mean(g_before)) if g_before else None
    summary.gated_toxicity_after = float(np.mean(g_after)) if g_after else None
    summary.seconds = time.perf_counter() - started
    return RephraseResult(records=out_records, summary=summary, field=field)


def _is_engine(engine: Any) -> bool:
    # duck-typed: anything with rephrase() and fingerprint() (tests wrap engines to count calls)
    return engine is not None and not isinstance(engine, str) and hasattr(engine, "rephrase")


def _settings(cfg: RephraseConfig, engine: str, dtype: str) -> dict[str, Any]:
    return {
        "engine": engine,
        "dtype": dtype,
        "mask_threshold": float(cfg.mask_threshold),
        "expert_weights": [float(w) for w in cfg.expert_weights],
        "combine_original": bool(cfg.combine_original),
    }


def _engine_key(cfg: RephraseConfig, engine: TMaRCoEngine | None, name: str, device: str) -> str:
    """Cache key of an engine's outputs: its settings and the models' identity, computed without loading models."""
    if engine is not None:
        settings = engine.fingerprint()
        models = getattr(engine, "model_identity", None) or models_fingerprint(cfg)
    else:
        dtype = "float16" if name == "batched" and device == "cuda" else "float32"
        settings = _settings(cfg, name, dtype)
        models = models_fingerprint(cfg)
    return _key({"v": _CACHE_VERSION, "settings": settings, "models": models})


# --------------------------------------------------------------------------------------------------------------------
# pipeline step: the training set
# --------------------------------------------------------------------------------------------------------------------


def _join_sample(prompt: str, continuation: str) -> str:
    return f"{(prompt or '').strip()} {(continuation or '').strip()}".strip()


def continuation_of(original: str, rephrased: str, boundary: int) -> str:
    """The part of ``rephrased`` that corresponds to ``original[boundary:]`` (the continuation after the prompt).

    The two texts are aligned character by character; a rewritten span that straddles the boundary goes to the
    continuation, so a masked word right after the prompt is kept in it.
    """
    import difflib

    matcher = difflib.SequenceMatcher(a=original, b=rephrased, autojunk=False)
    for tag, i1, i2, j1, _j2 in matcher.get_opcodes():
        if tag == "insert" and i1 == boundary:
            return rephrased[j1:].strip()
        if i1 <= boundary < i2:
            start = j1 + (boundary - i1) if tag == "equal" else j1
            return rephrased[start:].strip()
    return ""


def detoxify_training_set(
    recipe: Recipe,
    train_dataset: Any,
    progress: bool = True,
    engine: TMaRCoEngine | str | None = None,
    scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[Any, RephraseSummary]:
    """Rephrase the toxic continuations of the SFT training set; write ``data/train_raw.jsonl`` and
    ``data/train_detox.jsonl`` in the run directory.

    Each sample (prompt and continuation joined, column ``sample``) is gated and rephrased, so that TMaRCo fills masked
    words in context; only the rewritten *continuation* is kept (it is what the model learns to generate: the loss is
    completion-only), the prompt stays identical, and ``text`` is re-formatted with
    :func:`detox_sft.data.format_sample`, keeping the ``Prompt: ...\\nContinuation: ...`` format. Both files have the same rows in the same order;
    ``train_detox.jsonl`` adds ``original_continuation`` and the rephrase fields (:data:`ADDED_FIELDS`).

    Args:
        recipe: the run recipe (``rephrase`` section, ``run_path``).
        train_dataset: a :class:`datasets.Dataset` with columns ``prompt``, ``continuation``, ``text`` (a
            DatasetDict's ``train`` split is taken).
        progress: show progress bars.
        engine, scorer: override the recipe's (tests, benchmarks).

    Returns:
        (the detoxified Dataset, with the input's columns only; the :class:`RephraseSummary`).
    """
    from datasets import Dataset, DatasetDict

    from detox_sft.data import format_sample

    if isinstance(train_dataset, DatasetDict):  # (a DatasetDict is a dict: test its class, not its keys)
        if "train" not in train_dataset:
            raise RephraseError(
                f"the DatasetDict has no 'train' split (splits: {list(train_dataset)}). Fix: pass the split to "
                "detoxify, e.g. dataset['train']."
            )
        train_dataset = train_dataset["train"]
    columns = list(train_dataset.column_names)
    missing = [c for c in ("prompt", "continuation", "text") if c not in columns]
    if missing:
        raise RephraseError(
            f"training set lacks column(s) {missing}. Fix: load it with "
            "detox_sft.data.load_train_dataset(recipe.data, recipe.seed)."
        )
    data_dir = recipe.run_path / "data"
    rows = train_dataset.to_list()
    write_jsonl_atomic(rows, data_dir / "train_raw.jsonl")
    # TMaRCo sees the whole sample: with the prompt as context the experts and BART fill a masked word the way the
    # sentence needs it; alone, a continuation's first word has no context and is filled with whatever starts
    # sentences most often. Only the continuation part of the result is kept; the prompt stays as it was.
    samples = [{**row, "sample": _join_sample(row["prompt"], row["continuation"])} for row in rows]
    result = rephrase_dataset(
        samples,
        recipe.rephrase,
        field="sample",
        cache_dir=recipe.run_path / "rephrase" / "cache",
        progress=progress,
        engine=engine,
        scorer=scorer,
    )
    detox_rows, clean_rows = [], []
    for row, rec in zip(rows, result.records, strict=True):
        new = dict(rec)
        new["original_continuation"] = row["continuation"]
        if rec["rephrased"]:
            continuation = continuation_of(rec["sample"], rec["rephrased_text"], len(row["prompt"].strip()))
            if continuation:
                new["continuation"] = continuation
                new["text"] = format_sample(row["prompt"], continuation)
            else:  # TMaRCo rewrote nothing after the prompt into words: keep the sample as it was
                new["rephrased"] = False
                new["rephrase_status"] = "empty_continuation"
        detox_rows.append(new)
        clean_rows.append({c: new[c] for c in columns})
    write_jsonl_atomic(detox_rows, data_dir / "train_detox.jsonl")
    write_jsonl_atomic([result.summary.to_dict()], data_dir / "rephrase_summary.jsonl")
    return Dataset.from_list(clean_rows), result.summary


# --------------------------------------------------------------------------------------------------------------------
# notebook helpers
# --------------------------------------------------------------------------------------------------------------------


class HTML(str):
    """An HTML string that Jupyter renders (``_repr_html_``)."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        return str(self)


def _highlight_masked(original: str, masked: str, mask_token: str = "<mask>") -> str:
    """HTML of ``original`` with the characters TMaRCo masked (absent from ``masked``) marked."""
    import difflib

    pieces = masked.split(mask_token)
    keep = "".join(pieces)
    matcher = difflib.SequenceMatcher(a=original, b=keep, autojunk=False)
    marked = [True] * len(original)
    for block in matcher.get_matching_blocks():
        for i in range(block.a, block.a + block.size):
            marked[i] = False
    out, run, flag = [], [], None
    for ch, m in zip(original, marked, strict=True):
        if m != flag and run:
            out.append(_wrap("".join(run), flag))
            run = []
        flag = m
        run.append(ch)
    if run:
        out.append(_wrap("".join(run), flag))
    return "".join(out)


def _wrap(text: str, marked: bool | None) -> str:
    escaped = html.escape(text)
    return f'<mark style="background:#f8b4b4">{escaped}</mark>' if marked and text.strip() else escaped


def highlight_html(
    records: Sequence[dict[str, Any]] | str | os.PathLike[str],
    n: int = 10,
    field: str = "text",
    only_rephrased: bool = True,
) -> HTML:
    """An HTML table: the original with the masked tokens highlighted, beside the rephrased text and toxicities.

    Args:
        records: rephrased records (:attr:`RephraseResult.records`) or a JSONL path of them.
        n: rows to show.
        field: the original text field (``continuation`` for the training set).
        only_rephrased: show only records TMaRCo changed.
    """
    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    original_field = "original_continuation" if field == "continuation" else field
    rows = [r for r in records if r.get("rephrased") or not only_rephrased][:n]
    head = (
        "<tr><th>#</th><th>original (masked tokens highlighted)</th><th>rephrased</th>"
        "<th>toxicity before</th><th>toxicity after</th></tr>"
    )
    body = []
    for i, r in enumerate(rows):
        original = r.get(original_field) or r.get(field) or ""
        masked = r.get("masked_text")
        left = _highlight_masked(original, masked) if masked else html.escape(original)
        tb, ta = r.get("toxicity_before"), r.get("toxicity_after")
        body.append(
            f"<tr><td>{i}</td><td>{left}</td><td>{html.escape(r.get('rephrased_text') or '')}</td>"
            f"<td>{'' if tb is None else f'{tb:.3f}'}</td><td>{'' if ta is None else f'{ta:.3f}'}</td></tr>"
        )
    if not body:
        body.append('<tr><td colspan="5">no rephrased records</td></tr>')
    return HTML('<table class="detox-rephrase" style="text-align:left">' + head + "".join(body) + "</table>")


def plot_toxicity_histogram(
    records: Sequence[dict[str, Any]] | str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    bins: int = 20,
) -> Any:
    """Histogram of toxicity before and after rephrasing (all scored records); saved as PNG when ``path`` is given.

    Returns:
        The matplotlib Figure (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if isinstance(records, str | os.PathLike):
        records = read_jsonl(records)
    before = [r["toxicity_before"] for r in records if r.get("toxicity_before") is not None]
    after = [r["toxicity_after"] for r in records if r.get("toxicity_after") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    ax.hist(before, bins=edges, alpha=0.6, label=f"before (mean {np.mean(before):.3f})" if before else "before")
    ax.hist(after, bins=edges, alpha=0.6, label=f"after (mean {np.mean(after):.3f})" if after else "after")
    n_changed = sum(1 for r in records if r.get("rephrased"))
    ax.set_title(f"Toxicity before / after TMaRCo ({n_changed} of {len(records)} rephrased)")
    ax.set_xlabel("toxicity (scorer probability)")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detox-sft rephrase``."""
    parser.add_argument("--recipe", required=True, help="recipe name (offline, tutorial) or YAML path")
    parser.add_argument("--input", required=True, help="input JSONL file (one object per line)")
    parser.add_argument("--output", required=True, help="output JSONL file (written atomically)")
    parser.add_argument(
        "--engine",
        choices=("batched", "trustyai"),
        default=None,
        help="batched (default from the recipe) or trustyai (the reference TMaRCo)",
    )
    parser.add_argument("--field", default="text", help="the text field to detoxify (default: text)")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: <run>/rephrase/cache)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override rephrase.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run ``detox-sft rephrase``: every input record comes out, same order, with the rephrase fields added."""
    import sys

    recipe = load_recipe(args.recipe)
    try:
        records = read_jsonl(args.input)
    except (RephraseError, OSError) as exc:
        print(f"detox-sft rephrase: {exc}", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir) if args.cache_dir else recipe.run_path / "rephrase" / "cache"
    result = rephrase_dataset(
        records,
        recipe.rephrase,
        field=args.field,
        cache_dir=cache_dir,
        progress=not args.no_progress,
        engine=args.engine,
        device=args.device,
    )
    write_jsonl_atomic(result.records, args.output)
    s = result.summary
    print(
        f"{s.total} records -> {args.output}: {s.gated} at or above the gate ({s.gate_threshold}), "
        f"{s.rephrased} rephrased, {s.unchanged} unchanged, {s.missing} missing, {s.empty} empty, "
        f"{s.truncated} truncated, {s.errors} errors; {s.computed} computed, {s.cached} from the cache; "
        f"mean toxicity {_fmt(s.mean_toxicity_before)} -> {_fmt(s.mean_toxicity_after)} ({s.seconds:.1f} s)"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
