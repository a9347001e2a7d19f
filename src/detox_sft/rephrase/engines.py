"""TMaRCo engines: TrustyAI's reference and the batched engine, with the cost model that sizes its calls."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detox_sft.compat import BPE_CLEANUP_NOTICE, drop_log_messages, load_tmarco
from detox_sft.config import RephraseConfig
from detox_sft.devices import resolve_device as _resolve
from detox_sft.refs import resolve_ref


class RephraseError(ValueError):
    """Bad input or setup for rephrasing; the message says what to do."""


class EngineFailed(RephraseError):
    """The engine raised while rephrasing (a failed step, not bad input); the engine's exception is the cause."""


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

    def rephrase(self, texts: Sequence[str], keep_going: bool | None = None) -> list[EngineOutput]:
        """Score, mask and rephrase ``texts`` (strings); returns one :class:`EngineOutput` per text, in order.

        Args:
            texts: the sentences.
            keep_going: when the engine raises, retry the texts one by one and return an error output for each
                text that still fails, instead of raising; `None` takes ``cfg.keep_going``.

        Raises:
            EngineFailed: the engine raised (and not ``keep_going``); the exception is chained as its cause.
        """
        keep_going = self.cfg.keep_going if keep_going is None else keep_going
        prepared = [self.prepare(t) for t in texts]
        self.calls += len(texts)
        inputs = [p for p, _ in prepared]
        try:
            outs = self._run(inputs) if prepared else []
        except Exception as exc:  # any failure inside the models or TrustyAI's code (an API break too): see below
            if not keep_going:
                raise EngineFailed(
                    f"the {self.name} engine failed on a batch of {len(inputs)} text(s): {type(exc).__name__}: "
                    f"{exc}. Fix: see the cause below (after a trustyai or transformers upgrade, check "
                    "detox_sft.compat); or set rephrase.keep_going: true to keep such texts unchanged and go on."
                ) from exc
            # one bad sentence fails TMaRCo's whole list: retried alone, only the texts that fail alone are lost
            outs = [self._run_isolated(text) for text in inputs]
        for out, (text, truncated) in zip(outs, prepared, strict=True):
            out.truncated = truncated
            out.changed = out.error is None and out.rephrased != text
        return outs

    def _run(self, texts: list[str]) -> list[EngineOutput]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_isolated(self, text: str) -> EngineOutput:
        """``_run([text])``, or an error output (the text unchanged) when it raises: ``keep_going``."""
        try:
            return self._run([text])[0]
        except Exception as exc:  # keep_going: the user asked for any failure to become this text's error row
            return EngineOutput(text, text, error=f"{self.name} engine failed: {type(exc).__name__}: {exc}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change an engine's output (part of the cache key)."""
        return _settings(self.cfg, self.name, "float32")

    def model_identity(self) -> dict[str, Any]:
        """Which tokenizer and models this engine really holds (part of the cache key).

        Computed from the loaded objects, as :func:`models_fingerprint` identifies a recipe's models without loading
        them: an engine loaded from the recipe's models keys like the recipe, and one holding other models never
        reuses their cached outputs.
        """
        base, experts = self._models()
        return _identity(self.tokenizer, base, experts, _loaded_identity)

    def _models(self) -> tuple[Any, Sequence[Any]]:  # pragma: no cover - abstract
        """(base, [anti_expert, expert]) as loaded."""
        raise NotImplementedError


class ReferenceEngine(TMaRCoEngine):
    """TrustyAI's own TMaRCo: ``score`` -> ``mask`` -> ``rephrase``, called exactly as its documentation shows."""

    name = "trustyai"

    def __init__(self, tmarco: Any, cfg: RephraseConfig):
        super().__init__(tmarco.tokenizer, _max_positions([tmarco.base, *tmarco.experts]), cfg)
        self.tmarco = tmarco

    def _models(self) -> tuple[Any, Sequence[Any]]:
        return self.tmarco.base, self.tmarco.experts

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
        except IndexError as exc:
            # TMaRCo's known failure: re-tokenizing a masked sentence can add tokens (byte pieces of emoji / CJK), and
            # its rephrase then reads past the original encoding, failing the whole list; retried one by one, only
            # those sentences get an error row. Any other exception is not a data problem: it goes up.
            first = exc
        outs = []
        for text in texts:
            try:
                outs.extend(self._run_batch([text]))
            except IndexError as exc:
                outs.append(EngineOutput(text, text, error=f"trustyai TMaRCo failed: IndexError: {exc}"))
        if len(texts) > 1 and all(o.error for o in outs):
            raise first  # every sentence fails alone too: not a few odd sentences (an API change?)
        return outs


def _max_positions(models: Sequence[Any]) -> int:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else 1024


class BatchedEngine(TMaRCoEngine):
    """TMaRCo's algorithm over many sentences at once (see :mod:`detox_sft.rephrase`).

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

    @classmethod
    def from_tmarco(cls, tmarco: Any, cfg: RephraseConfig, **kwargs: Any) -> BatchedEngine:
        """Share a TMaRCo's tokenizer and models (no copy: on CPU float32 both engines can use the same weights)."""
        return cls(tmarco.tokenizer, tmarco.base, tmarco.experts, cfg, **kwargs)

    def fingerprint(self) -> dict[str, Any]:
        return _settings(self.cfg, self.name, str(self.dtype).replace("torch.", ""))

    def _models(self) -> tuple[Any, Sequence[Any]]:
        return self.base, self.experts

    # -- model calls ------------------------------------------------------------------------------------------------

    def _experts_logits_at(self, rows: Sequence[Sequence[int]], queries: Sequence[tuple[int, int]]) -> list[Any]:
        """:meth:`_logits_at` of each expert, in order, one after the other on torch's threads.

        Not side by side on split threads: torch's thread count is process-wide, and lowering it here would slow
        whatever else the caller's process runs meanwhile (library code leaves it to the caller; on a busy box,
        one torch thread set by the caller in its own process is what helps most: see BENCHMARKS.md, rephrase).
        """
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
        jobs, base_rows, base_queries, base_query_of = self._fill_jobs(texts, scores, masked, threshold)
        if not jobs:
            return out, errors, gaps
        base_logits = self._logits_at(self.base, base_rows, base_queries)

        mask_token, mask_id = tok.mask_token, tok.mask_token_id  # properties: read once
        active = jobs
        while active:
            pending, still = self._expert_inputs(active, errors, combine, mask_token, mask_id)
            if not pending:
                break
            self._fill_next(pending, base_logits, base_query_of, weights, gaps)
            active = [job for job in still if errors[job[0]] is None]

        with drop_log_messages(*BPE_CLEANUP_NOTICE):  # decoded as TrustyAI decodes, without transformers' notice
            for i, _, _, ids, _ in jobs:
                if errors[i] is None:
                    out[i] = tok.decode(ids, clean_up_tokenization_spaces=True, skip_special_tokens=True)
        return out, errors, gaps

    def _fill_jobs(
        self, texts: Sequence[str], scores: Sequence[Any], masked: Sequence[str], threshold: float
    ) -> tuple[list[list[Any]], list[list[int]], list[tuple[int, int]], dict[tuple[int, int], int]]:
        """One job per sentence with something masked, and the base model's queries: one per mask.

        A job is ``[sentence index, masked tokens, original inner ids, rephrased ids, cursor]``; the queries are
        (row of the original encodings, position), indexed by (sentence index, mask position).
        """
        tok = self.tokenizer
        jobs: list[list[Any]] = []
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
        return jobs, base_rows, base_queries, base_query_of

    def _expert_inputs(
        self, active: list[list[Any]], errors: list[str | None], combine: bool, mask_token: str, mask_id: int
    ) -> tuple[list[tuple[list[Any], list[int], int]], list[list[Any]]]:
        """Move each job to its next mask and build the experts' input there.

        Returns ``(job, expert input ids, mask position)`` per job still filling, and those jobs; a job whose input
        does not hold exactly one mask token gets its error.
        """
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
        return pending, still

    def _fill_next(
        self,
        pending: list[tuple[list[Any], list[int], int]],
        base_logits: Any,
        base_query_of: dict[tuple[int, int], int],
        weights: list[float],
        gaps: list[float],
    ) -> None:
        """Fill the current mask of each pending job with the argmax of base + weighted expert logits."""
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

    name = engine or cfg.engine
    if name not in ("batched", "trustyai"):
        raise RephraseError(f"unknown engine {name!r}. Fix: use 'batched' or 'trustyai'.")
    device = resolve_device(device or cfg.device)
    tmarco = load_tmarco(
        cfg.base_model,
        cfg.expert,
        cfg.anti_expert,
        device=device,
        expert_weights=list(cfg.expert_weights),
        revisions=(cfg.base_model_revision, cfg.expert_revision, cfg.anti_expert_revision),
    )
    if name == "trustyai":
        return ReferenceEngine(tmarco, cfg)
    return BatchedEngine.from_tmarco(tmarco, cfg, device=device)


# --------------------------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------------------------


def _model_dir(ref: str, revision: str | None = None) -> Path | None:
    path = Path(resolve_ref(ref))
    if path.is_dir():
        return path
    with contextlib.suppress(Exception):  # a hub id: its snapshot directory (at the revision) in the local HF cache
        from transformers.utils import cached_file

        pinned = {"revision": revision} if revision else {}
        found = cached_file(ref, "config.json", _raise_exceptions_for_missing_entries=False, **pinned)
        if found:
            return Path(found).parent
    return None


def models_fingerprint(cfg: RephraseConfig) -> dict[str, Any]:
    """Identity of the recipe's tokenizer, base, expert and anti-expert without loading them (part of the cache key).

    A model is identified by its directory's files (config and tokenizer bytes, weight file sizes and mtimes), a hub
    id by its snapshot at the recipe's revision, or by its name (and revision) when not in the local cache. Equal to
    :meth:`TMaRCoEngine.model_identity` of an engine loaded from these references (TMaRCo loads its tokenizer from
    the base model's directory).
    """
    base = (cfg.base_model, cfg.base_model_revision)
    experts = [(cfg.anti_expert, cfg.anti_expert_revision), (cfg.expert, cfg.expert_revision)]
    return _identity(base, base, experts, lambda pinned: _ref_identity(*pinned))


def _identity(
    tokenizer: Any, base: Any, experts: Sequence[Any], identify: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    anti_expert, expert = experts
    roles = {"tokenizer": tokenizer, "base": base, "anti_expert": anti_expert, "expert": expert}
    return {role: identify(obj) for role, obj in roles.items()}


def _files_digest(path: Path) -> str:
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
    return digest.hexdigest()


def _ref_identity(ref: str, revision: str | None = None) -> dict[str, Any]:
    path = _model_dir(ref, revision)
    if path is not None:
        return {"files": _files_digest(path)}
    return {"ref": ref, "revision": revision} if revision else {"ref": ref}


def _loaded_identity(obj: Any) -> dict[str, Any]:
    """A loaded model's or tokenizer's identity: its directory's files, as :func:`_ref_identity` gives them.

    One with no directory (built in memory) is identified by its content: a model by its config and weights, a
    tokenizer by its vocabulary and special tokens.
    """
    ref = str(obj.name_or_path or "")
    # the commit a hub model was loaded from (transformers records it on the config)
    revision = getattr(getattr(obj, "config", None), "_commit_hash", None)
    path = _model_dir(ref, revision if isinstance(revision, str) else None) if ref else None
    if path is not None:
        return {"files": _files_digest(path)}
    import torch

    if isinstance(obj, torch.nn.Module):
        content = {"config": obj.config.to_json_string(), "weights": _weights_digest(obj)}
    else:
        content = {"vocab": sorted(obj.get_vocab().items()), "special": obj.special_tokens_map}
    text = json.dumps(content, sort_keys=True, default=str)
    return {"ref": ref, "content": hashlib.sha256(text.encode()).hexdigest()}


def _weights_digest(model: Any) -> str:
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _settings(cfg: RephraseConfig, engine: str, dtype: str) -> dict[str, Any]:
    return {
        "engine": engine,
        "dtype": dtype,
        "mask_threshold": float(cfg.mask_threshold),
        "expert_weights": [float(w) for w in cfg.expert_weights],
        "combine_original": bool(cfg.combine_original),
    }
