"""TMaRCo engines: TrustyAI's own (``trustyai``) and the batched one (``batched``: the same texts, many sentences at
a time); :func:`load_engine` builds either, :func:`identity` says what determines their outputs without loading."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.compat import BPE_CLEANUP_NOTICE, drop_log_messages, load_tmarco
from detox_sft.config import RephraseConfig
from detox_sft.devices import resolve_device
from detox_sft.refs import resolve_ref
from detox_sft.rephrase.cache import RephraseError


class EngineFailed(RephraseError):
    """The engine raised while rephrasing (a failed step, not bad input); the message names the engine's exception."""


@dataclass
class EngineOutput:
    """What an engine returns for one sentence."""

    masked: str  # the sentence with its high-scoring tokens replaced by the mask token
    rephrased: str  # the rewrite (the engine's input when nothing was masked or the sentence failed)
    changed: bool = False  # rephrased differs from the engine's (prepared) input
    truncated: bool = False  # the text was longer than the models' context and was cut to fit
    error: str | None = None  # why the sentence could not be processed
    min_gap: float = math.inf  # smallest top-2 logit gap over the filled positions (batched engine: near-ties)
    min_margin: float = math.inf  # smallest |score - mask_threshold| over the tokens (batched engine)


class TMaRCoEngine:
    """Both engines' input preparation, failures and identity; subclasses implement ``_run(texts) -> outputs``."""

    name = "base"
    data_errors: tuple[type[Exception], ...] = ()  # failures of odd sentences, not of the engine

    def __init__(self, tokenizer: Any, base: Any, experts: Sequence[Any], cfg: RephraseConfig):
        self.tokenizer, self.base, self.experts, self.cfg = tokenizer, base, list(experts), cfg
        limits = [getattr(m.config, "max_position_embeddings", None) for m in [base, *experts]]
        limits = [x for x in limits if isinstance(x, int) and x > 0]
        # a margin under the position embeddings: a scoring variant adds "<pad><mask>", <s> and </s>, re-tokenizing
        # a masked string a token or two
        self.max_tokens = max(1, (min(limits) if limits else 1024) - 6)
        self.calls = 0  # sentences processed (tests count them to prove the cache works)
        # seconds spent scoring and rephrasing (mask + fill) over the engine's life: the benchmark reads them
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

    def rephrase(self, texts: Sequence[str], keep_going: bool | None = None) -> list[EngineOutput]:
        """Score, mask and rephrase ``texts``: one :class:`EngineOutput` each, in order. On a failure texts are retried
        alone; one failing alone gets an error output with ``keep_going`` (default ``cfg.keep_going``) or on a known
        data error, else :class:`EngineFailed` is raised."""
        keep_going = self.cfg.keep_going if keep_going is None else keep_going
        prepared = [self.prepare(t) for t in texts]
        self.calls += len(texts)
        inputs = [p for p, _ in prepared]
        try:
            outs = self._run(inputs) if prepared else []
        except Exception as exc:  # any failure inside the models or TrustyAI's code (an API break too)
            if not (keep_going or isinstance(exc, self.data_errors)):
                raise self._failed(exc, len(inputs)) from exc
            outs = [self._run_alone(text, keep_going) for text in inputs]
            if not keep_going and len(inputs) > 1 and all(o.error for o in outs):
                raise self._failed(exc, len(inputs)) from exc  # every sentence fails alone too: not odd sentences
        for out, (text, truncated) in zip(outs, prepared, strict=True):
            out.truncated = truncated
            out.changed = out.error is None and out.rephrased != text
        return outs

    def _run(self, texts: list[str]) -> list[EngineOutput]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_alone(self, text: str, keep_going: bool) -> EngineOutput:
        try:
            return self._run([text])[0]
        except Exception as exc:  # the text's error row where the user asked for it, or a known data error
            if not (keep_going or isinstance(exc, self.data_errors)):
                raise self._failed(exc, 1) from exc
            return EngineOutput(text, text, error=f"{self.name} engine failed: {type(exc).__name__}: {exc}")

    def _failed(self, exc: Exception, n: int) -> EngineFailed:
        return EngineFailed(
            f"the {self.name} engine failed on a batch of {n} text(s) with {type(exc).__name__}: {exc}. Fix: if that "
            "error comes from trustyai or transformers (after an upgrade), check the shims in detox_sft.compat; or set "
            "rephrase.keep_going: true to keep such texts unchanged and go on."
        )


class ReferenceEngine(TMaRCoEngine):
    """TrustyAI's own TMaRCo: ``score`` -> ``mask`` -> ``rephrase``, called exactly as its documentation shows."""

    name = "trustyai"
    # TMaRCo's known failure: re-tokenizing a masked sentence can add tokens (byte pieces of emoji / CJK), and its
    # rephrase then reads past the original encoding, failing the whole list
    data_errors = (IndexError,)

    def __init__(self, tmarco: Any, cfg: RephraseConfig):
        super().__init__(tmarco.tokenizer, tmarco.base, tmarco.experts, cfg)
        self.tmarco = tmarco

    def _run(self, texts: list[str]) -> list[EngineOutput]:
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


class BatchedEngine(TMaRCoEngine):
    """trustyai 0.6.4's TMaRCo ``score`` / ``mask`` / ``rephrase`` over many sentences at once, with the same tokenizer
    calls (so the same token ids); model calls stop at the last decoder position needed. ``experts``: ``[anti_expert,
    expert]``; ``dtype`` `None`: float16 on CUDA, float32 on CPU."""

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

        if len(experts) != len(cfg.expert_weights):
            raise RephraseError(
                f"{len(experts)} experts but {len(cfg.expert_weights)} expert_weights. "
                "Fix: give one weight per expert: [anti_expert_weight, expert_weight]."
            )
        self.device = device
        self.dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        models = [m.to(device=device, dtype=self.dtype).eval() for m in [base, *experts]]
        super().__init__(tokenizer, models[0], models[1:], cfg)
        self.max_batch_tokens = max_batch_tokens or (65536 if device == "cuda" else 8192)
        # one model call's cost in token positions (see _cheapest_split): on CPU measured for the decoder (~70 at
        # bart-base size, ~200 for the zoo's d=128 BART); on CUDA a call is dozens of kernel launches, positions ~free
        self.call_tokens = 4096 if device == "cuda" else 128

    @classmethod
    def from_tmarco(cls, tmarco: Any, cfg: RephraseConfig, **kwargs: Any) -> BatchedEngine:
        """Share a TMaRCo's tokenizer and models (no copy: on CPU float32 both engines can use the same weights)."""
        return cls(tmarco.tokenizer, tmarco.base, tmarco.experts, cfg, **kwargs)

    def _run(self, texts: list[str]) -> list[EngineOutput]:
        thr = float(self.cfg.mask_threshold)
        start = time.perf_counter()
        scores, errors = self.score(texts)
        scored = time.perf_counter()
        self.timings["score"] += scored - start
        masked = self.mask(texts, scores, thr)
        ok = [i for i in range(len(texts)) if errors[i] is None]
        rephrased, fill_errors, gaps = self.fill(
            [texts[i] for i in ok], [scores[i] for i in ok], [masked[i] for i in ok], thr
        )
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()  # the step's kernels belong to the step
        self.timings["rephrase"] += time.perf_counter() - scored
        outs = [EngineOutput(t, t, error=e) for t, e in zip(texts, errors, strict=True)]
        for k, i in enumerate(ok):
            if fill_errors[k] is not None:
                outs[i] = EngineOutput(texts[i], texts[i], error=fill_errors[k])
                continue
            outs[i] = EngineOutput(masked[i], rephrased[k], min_gap=gaps[k])
            if len(scores[i]):
                outs[i].min_margin = float(np.min(np.abs(np.asarray(scores[i], dtype=np.float64) - thr)))
        return outs

    # -- TMaRCo.score ------------------------------------------------------------------------------------------------

    def _mask_variants(self, sentence: str) -> list[str]:
        # TMaRCo.mask_tokens(sentence, pad_token + mask_token)
        tok = self.tokenizer
        tokens = tok.tokenize(sentence)
        mask = tok.pad_token + tok.mask_token
        return [tok.convert_tokens_to_string([*tokens[:i], mask, *tokens[i + 1 :]]) for i in range(len(tokens))]

    def score(self, texts: Sequence[str]) -> tuple[list[Any], list[str | None]]:
        """TMaRCo.score for many sentences at once. Returns (scores per sentence, error per sentence)."""
        import torch

        mask_id = self.tokenizer.mask_token_id  # a property lookup each time: read it once
        errors: list[str | None] = [None] * len(texts)
        variants = [(si, v) for si, sentence in enumerate(texts) for v in self._mask_variants(sentence)]
        # one tokenizer call for every variant of every sentence (each string encoded on its own, unpadded: the ids
        # equal TMaRCo's per-sentence call)
        all_ids = self.tokenizer([v for _, v in variants])["input_ids"] if variants else []
        hits = [[i for i, t in enumerate(row) if t == mask_id] for row in all_ids]
        for (si, _), found in zip(variants, hits, strict=True):
            if len(found) != 1:
                errors[si] = "a masked variant does not hold exactly one mask token"
        kept = [k for k, (si, _) in enumerate(variants) if errors[si] is None]
        scores: list[Any] = [[] for _ in texts]
        if not kept:
            return scores, errors
        owner = np.asarray([variants[k][0] for k in kept])
        queries = [(row, hits[k][0]) for row, k in enumerate(kept)]
        logits = self._experts_logits_at([all_ids[k] for k in kept], queries)
        js_rows = self._js_pairs([torch.softmax(x, dim=1) for x in logits])  # one array [n_rows] per expert pair
        # rows are in sentence order: each sentence's rows are one slice
        sentence_ids, first = np.unique(owner, return_index=True)
        for si, a, b in zip(sentence_ids, first, [*first[1:], len(owner)], strict=True):
            # normalize=True: each pair's distances over the sentence mean, then averaged over the pairs
            scores[int(si)] = np.average([js[a:b] / np.average(js[a:b]) for js in js_rows], axis=0)
        return scores, errors

    def _js_pairs(self, distributions: list[Any]) -> list[np.ndarray]:
        out = []
        for p, q in itertools.combinations(distributions, 2):
            if p.device.type != "cpu":
                out.append(_jensenshannon_torch(p, q).cpu().numpy())
                continue
            # scipy as TMaRCo, in row chunks (changes no bit) over torch's threads (numpy/scipy release the GIL)
            from concurrent.futures import ThreadPoolExecutor

            import torch
            from scipy.spatial.distance import jensenshannon

            chunks = [(p[i : i + 128].numpy(), q[i : i + 128].numpy()) for i in range(0, p.shape[0], 128)]
            with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
                out.append(np.concatenate(list(pool.map(lambda pq: jensenshannon(*pq, axis=1), chunks))))
        return out

    # -- TMaRCo.mask -------------------------------------------------------------------------------------------------

    def mask(self, texts: Sequence[str], scores: Sequence[Any], threshold: float) -> list[str]:
        """TMaRCo.mask with precomputed scores."""
        tok = self.tokenizer
        return [
            tok.convert_tokens_to_string(
                [tok.mask_token if scores[si][i] > threshold else t for i, t in enumerate(tok.tokenize(sentence))]
            )
            for si, sentence in enumerate(texts)
        ]

    # -- TMaRCo.rephrase ---------------------------------------------------------------------------------------------

    def fill(
        self, texts: Sequence[str], scores: Sequence[Any], masked: Sequence[str], threshold: float
    ) -> tuple[list[str], list[str | None], list[float]]:
        """TMaRCo.rephrase (conditional) for many sentences, masks filled in lockstep: (texts, errors, min top-2 gaps)."""
        tok = self.tokenizer
        mask_token, mask_id = tok.mask_token, tok.mask_token_id  # properties: read once
        out, errors, gaps = list(texts), [None] * len(texts), [math.inf] * len(texts)
        # a job per sentence with something masked: [sentence, masked tokens, original inner ids, filled ids, cursor];
        # the base model is read once, at every mask of the original encodings
        jobs: list[list[Any]] = []
        base_rows: list[list[int]] = []
        base_queries: list[tuple[int, int]] = []
        base_query_of: dict[tuple[int, int], int] = {}
        for i, original in enumerate(texts):
            if len(original.strip()) == 0 or max(scores[i]) <= threshold:
                continue  # TMaRCo passes these through unchanged
            original_ids = tok(original)["input_ids"]
            mtoks = tok.tokenize(masked[i])
            base_rows.append(original_ids)
            for idx in [idx for idx, t in enumerate(mtoks) if t == mask_token]:
                base_query_of[(i, idx)] = len(base_queries)
                # TMaRCo reads the base at 1 + idx of the *original* encoding, and raises IndexError past its end (a
                # masked string re-tokenized can gain emoji / CJK byte pieces): we read the last position (deviation)
                base_queries.append((len(base_rows) - 1, min(1 + idx, len(original_ids) - 1)))
            jobs.append([i, mtoks, original_ids[1:-1], [], 0])
        if not jobs:
            return out, errors, gaps
        base_logits = self._logits_at(self.base, base_rows, base_queries)
        weights = [float(w) for w in self.cfg.expert_weights]
        active = jobs
        while active:
            pending = self._expert_inputs(active, errors, mask_token, mask_id)
            if not pending:
                break
            # fill each pending job's mask with the argmax of base + weighted expert logits
            combined = base_logits[[base_query_of[(job[0], job[4])] for job, _, _ in pending]].clone()
            queries = [(r, position) for r, (_, _, position) in enumerate(pending)]
            for w, logits in zip(weights, self._experts_logits_at([p[1] for p in pending], queries), strict=True):
                combined += w * logits  # TMaRCo: next_token_logits += weight * expert_logits (float32, same order)
            values = combined.cpu().numpy()
            chosen = values.argmax(axis=1)  # np.argmax, as TMaRCo: first index on ties
            top2 = np.partition(values, -2, axis=1)[:, -2:] if values.shape[1] > 1 else None
            for k, (job, _, _) in enumerate(pending):
                job[3].append(int(chosen[k]))
                job[4] += 1
                if top2 is not None:
                    gaps[job[0]] = min(gaps[job[0]], float(top2[k, 1] - top2[k, 0]))
            active = [job for job, _, _ in pending if errors[job[0]] is None]
        with drop_log_messages(*BPE_CLEANUP_NOTICE):  # decoded as TrustyAI decodes, without transformers' notice
            for i, _, _, ids, _ in jobs:
                if errors[i] is None:
                    out[i] = tok.decode(ids, clean_up_tokenization_spaces=True, skip_special_tokens=True)
        return out, errors, gaps

    def _expert_inputs(
        self, active: list[list[Any]], errors: list[str | None], mask_token: str, mask_id: int
    ) -> list[tuple[list[Any], list[int], int]]:
        """Move each job to its next mask: ``(job, expert input ids, mask position)`` per job still filling (a job
        whose input lacks exactly one mask gets its error)."""
        tok = self.tokenizer
        stepping = []  # (job, expert input string)
        for job in active:
            _, mtoks, original_inner, ids, idx = job
            start = idx
            while idx < len(mtoks) and mtoks[idx] != mask_token:
                idx += 1
            ids.extend(tok.convert_tokens_to_ids(mtoks[start:idx]))
            job[4] = idx
            if idx == len(mtoks):
                continue
            current = ids + [mask_id]
            if self.cfg.combine_original and idx < len(mtoks) - 2:
                current = current + original_inner[idx + 1 :]
            stepping.append((job, tok.convert_tokens_to_string(tok.convert_ids_to_tokens(current))))
        # one tokenizer call per step for all sentences (each string encoded on its own, as TMaRCo does)
        encoded = tok([sequence for _, sequence in stepping])["input_ids"] if stepping else []
        pending = []
        for (job, _), seq_ids in zip(stepping, encoded, strict=True):
            hits = [p for p, t in enumerate(seq_ids) if t == mask_id]
            if len(hits) != 1:
                errors[job[0]] = "an expert input does not hold exactly one mask token"
                continue
            pending.append((job, seq_ids, hits[0]))
        return pending

    # -- model calls ------------------------------------------------------------------------------------------------

    def _experts_logits_at(self, rows: Sequence[Sequence[int]], queries: Sequence[tuple[int, int]]) -> list[Any]:
        # one expert after the other on torch's threads, not side by side on split threads: torch's thread count is
        # process-wide, and library code leaves it to the caller (see BENCHMARKS.md, rephrase)
        return [self._logits_at(model, rows, queries) for model in self.experts]

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

                # BartForConditionalGeneration.forward minus the decoder positions after the last one asked for (the
                # decoder is causal: they cannot change earlier ones) and the LM head elsewhere
                enc = core.encoder(input_ids=ids, attention_mask=attn).last_hidden_state
                dec_ids = shift_tokens_right(ids, core.config.pad_token_id, core.config.decoder_start_token_id)
                picked = torch.empty((len(q_row), enc.shape[-1]), dtype=enc.dtype, device=enc.device)
                # rows grouped by the last position they need: each group's decoder call stops there
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


def _cheapest_split(sizes: Sequence[int], call_tokens: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut rows sorted by size into calls ``[start, end)`` minimising ``sum(call_tokens + rows * padded size)``; no
    call holds over ``max_tokens`` positions unless one row alone does."""
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


def _decoder_groups(q_row: Any, q_pos: Any, call_tokens: int, max_tokens: int, device: Any) -> list[tuple]:
    """A chunk's rows as decoder calls that each stop at the last position their rows need: ``(rows, queries, local
    rows of the queries, cut)`` per call."""
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
    index = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return [
        (index(rows), index(qs), index([slot[q_row_list[qi]][1] for qi in qs]), need[rows[-1]] + 1)
        for rows, qs in zip(groups, queries, strict=True)
    ]


def _jensenshannon_torch(p: Any, q: Any) -> Any:
    """scipy.spatial.distance.jensenshannon(p, q, axis=1) in torch (float32, for GPU batches)."""
    import torch

    p, q = p / p.sum(dim=1, keepdim=True), q / q.sum(dim=1, keepdim=True)
    m = (p + q) / 2.0

    def rel_entr(x: Any, y: Any) -> Any:  # scipy.special.rel_entr; y >= x / 2 here, so y = 0 only where x = 0
        return torch.where(x > 0, x * torch.log(torch.where(x > 0, x / y, torch.ones_like(x))), torch.zeros_like(x))

    return torch.sqrt((rel_entr(p, m).sum(dim=1) + rel_entr(q, m).sum(dim=1)) / 2.0)


def load_engine(cfg: RephraseConfig, engine: str | None = None, device: str | None = None) -> TMaRCoEngine:
    """Load the models of ``cfg`` and build an engine (``batched`` or ``trustyai``; default ``cfg.engine``)."""
    name = engine or cfg.engine
    if name not in ("batched", "trustyai"):
        raise RephraseError(f"unknown engine {name!r}. Fix: use 'batched' or 'trustyai'.")
    device = resolve_device(device or cfg.device, "rephrase.device")
    tmarco = load_tmarco(
        cfg.base_model,
        cfg.expert,
        cfg.anti_expert,
        device=device,
        expert_weights=list(cfg.expert_weights),
        revisions=(cfg.base_model_revision, cfg.expert_revision, cfg.anti_expert_revision),
    )
    return ReferenceEngine(tmarco, cfg) if name == "trustyai" else BatchedEngine.from_tmarco(tmarco, cfg, device=device)


# -- what determines an engine's outputs (the rephrase step keys its cache with it) --------------------------------


def identity(cfg: RephraseConfig, engine: Any = None, device: str = "cpu") -> dict[str, Any]:
    """The settings and models that determine an engine's outputs: a loaded ``engine``'s (another kind's by its
    ``identity()``), else, unloaded, those the engine named by ``engine`` (default ``cfg.engine``) would load on
    ``device``: models by their directory's files, a hub id by its cached snapshot, else by name (and revision)."""
    if isinstance(engine, TMaRCoEngine):
        cfg, name, dtype = engine.cfg, engine.name, str(getattr(engine, "dtype", "float32")).replace("torch.", "")
        anti_expert, expert = engine.experts
        objects = {"tokenizer": engine.tokenizer, "base": engine.base, "anti_expert": anti_expert, "expert": expert}
        models = {role: _loaded_identity(obj) for role, obj in objects.items()}
    elif engine is not None and not isinstance(engine, str):
        return engine.identity()
    else:
        name = engine or cfg.engine
        dtype = "float16" if name == "batched" and device == "cuda" else "float32"
        base = (cfg.base_model, cfg.base_model_revision)
        refs = {"tokenizer": base, "base": base, "anti_expert": (cfg.anti_expert, cfg.anti_expert_revision)}
        refs["expert"] = (cfg.expert, cfg.expert_revision)
        models = {role: _ref_identity(ref, revision) for role, (ref, revision) in refs.items()}
    weights = [float(w) for w in cfg.expert_weights]
    settings = {"engine": name, "dtype": dtype, "mask_threshold": float(cfg.mask_threshold), "expert_weights": weights}
    return {"settings": settings | {"combine_original": bool(cfg.combine_original)}, "models": models}


def _ref_identity(ref: str, revision: str | None = None) -> dict[str, Any]:
    path = Path(resolve_ref(ref))
    if not path.is_dir():
        path = None
        with contextlib.suppress(Exception):  # a hub id: its snapshot (at the revision) in the local HF cache
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(ref, "config.json", revision=revision)
            path = Path(found).parent if isinstance(found, str) else None
    if path is None:
        return {"ref": ref, "revision": revision} if revision else {"ref": ref}
    digest = hashlib.sha256()  # config and tokenizer bytes, weight file sizes and times
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in (".json", ".txt", ".model"):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return {"files": digest.hexdigest()}


def _loaded_identity(obj: Any) -> dict[str, Any]:
    """A loaded object's identity: its source directory's (as :func:`_ref_identity`), else a hash of its content."""
    ref = str(obj.name_or_path or "")
    commit = getattr(getattr(obj, "config", None), "_commit_hash", None)  # the hub commit transformers loaded
    found = _ref_identity(ref, commit if isinstance(commit, str) else None) if ref else {}
    if "files" in found:
        return found
    import torch

    digest = hashlib.sha256()
    if isinstance(obj, torch.nn.Module):
        digest.update(obj.config.to_json_string().encode())
        for name, tensor in obj.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(json.dumps([sorted(obj.get_vocab().items()), obj.special_tokens_map], default=str).encode())
    return {"ref": ref, "content": digest.hexdigest()}
