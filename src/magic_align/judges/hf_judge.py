"""A judge that runs a local Hugging Face vision-language model through transformers.

Documented models: MedGemma-4B (`google/medgemma-4b-it`, close to GPT-4o as the paper's judge: docs/method.md
section 10) and Qwen2.5-VL (`Qwen/Qwen2.5-VL-3B-Instruct`); any model that loads with `AutoProcessor` and
`AutoModelForImageTextToText` and has a chat template with image support should work. `judge.model` is the
hub id or a local folder.

Concurrent `judge()` calls are collected into batches of up to `judge.hf_batch_size` and generated together
(greedy decoding, left padding) in a worker thread, so the event loop keeps collecting the next batch while
one runs. The prompt and the parser are the same as the HTTP judge's (`prompts.py`, `parsing.py`); the
structured style asks for JSON in the text (there is no constrained decoding here). An unreadable answer gets
one repair turn, batched like any other request. A batch whose generation fails (out of memory, say) gives its
images no answer: each raises `JudgeCallError` and stays to be asked again; a model that cannot be loaded
raises `HFJudgeLoadError`, which stops the stage. The model is loaded on the first call (on CUDA in bfloat16
when available, else CPU float32), so building the judge to learn its id costs nothing.

Images never leave the process, so real images may be graded (privacy.py); they are still downscaled to
`judge.image_size` first so both backends see the same input.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from magic_align.checklists.schema import Checklist
from magic_align.config import JudgeConfig
from magic_align.judges.base import JudgeCallError, Verdict
from magic_align.judges.openai_judge import REPAIR_SEPARATOR, after_repair, answer_verdict, max_output_tokens
from magic_align.judges.parsing import parse_answer
from magic_align.judges.privacy import downscale
from magic_align.judges.prompts import prompt_version, render_prompt, render_repair

DOCUMENTED_MODELS = ("google/medgemma-4b-it", "Qwen/Qwen2.5-VL-3B-Instruct")


class HFJudgeLoadError(JudgeCallError):
    """The model or processor named by `judge.model` could not be loaded; no call can succeed."""

    def __init__(self, message: str):
        super().__init__(message, cause="judge model could not be loaded", systematic=True)


@dataclass
class _Generation:
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    cause: str | None = None  # the short reason the stage counts failed calls by


@dataclass
class _Request:
    messages: list[dict]
    image: Image.Image
    max_new_tokens: int
    future: asyncio.Future = field(repr=False)


class HFJudge:
    """`Judge` over a local transformers VLM (see the module docstring).

    `model` and `processor` may be passed in directly (already loaded); otherwise they are loaded from
    `cfg.model` on first use.
    """

    def __init__(self, cfg: JudgeConfig, *, model: Any = None, processor: Any = None, device: str | None = None) -> None:
        self.cfg = cfg
        self.id = f"hf:{cfg.model}"
        self.prompt_version = prompt_version(cfg.prompt_style)
        self._model = model
        self._processor = processor
        self._device = device
        self._load_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # sizes of the batches generated so far (for tests and logs)

    def __repr__(self) -> str:
        return f"HFJudge(id={self.id!r}, batch_size={self.cfg.hf_batch_size})"

    def prompt_text(self, checklist: Checklist) -> str:
        return render_prompt(checklist, self.cfg.prompt_style)

    # ------------------------------------------------------------------------------------ model
    def _ensure_loaded(self) -> None:
        with self._load_lock:
            if self._model is not None and self._processor is not None:
                if self._device is None:
                    self._device = str(next(self._model.parameters()).device)
                return
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            try:
                processor = self._processor or AutoProcessor.from_pretrained(self.cfg.model)
                model = self._model or AutoModelForImageTextToText.from_pretrained(self.cfg.model, dtype=dtype)
            except (OSError, ValueError, ImportError, KeyError, AttributeError) as error:
                raise HFJudgeLoadError(
                    f"cannot load the judge model judge.model = {self.cfg.model!r} with AutoProcessor and "
                    f"AutoModelForImageTextToText: {type(error).__name__}: {error}. Expected a hub id such as "
                    f"{DOCUMENTED_MODELS[0]!r} or a local folder saved with save_pretrained."
                ) from error
            self._model = model.to(device).eval()
            self._processor = processor
            self._device = device

    def _generate_batch(self, batch: list[_Request]) -> list[_Generation]:
        """Runs in a worker thread: one padded, greedy generate() call for the whole batch."""
        import torch

        self._ensure_loaded()
        processor, model = self._processor, self._model
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        started = time.perf_counter()
        texts = [processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False) for request in batch]
        inputs = processor(text=texts, images=[[request.image] for request in batch], return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max(request.max_new_tokens for request in batch), do_sample=False, pad_token_id=pad_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        seconds = time.perf_counter() - started
        input_counts = inputs["attention_mask"].sum(dim=1).tolist()
        output_counts = (new_tokens != pad_id).sum(dim=1).tolist()
        return [
            _Generation(text=answer, input_tokens=int(n_in), output_tokens=int(n_out), seconds=seconds)
            for answer, n_in, n_out in zip(answers, input_counts, output_counts)
        ]

    # ---------------------------------------------------------------------------------- batching
    async def _generate(self, messages: list[dict], image: Image.Image, max_new_tokens: int) -> _Generation:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (e.g. a second asyncio.run): start a fresh queue
            self._loop, self._pending, self._worker = loop, [], None
        request = _Request(messages, image, max_new_tokens, loop.create_future())
        self._pending.append(request)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await request.future

    async def _drain(self) -> None:
        size = self.cfg.hf_batch_size
        while self._pending:
            batch = self._pending[:size]
            del self._pending[:size]
            batch = [request for request in batch if not request.future.done()]  # callers that were cancelled
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self._generate_batch, batch)
            except HFJudgeLoadError as error:
                for request in batch + self._pending:
                    if not request.future.done():
                        request.future.set_exception(error)
                self._pending = []
                return
            except Exception as error:  # e.g. out of memory on one batch: those images fail, the stage goes on
                results = [
                    _Generation(error=f"generation failed: {type(error).__name__}: {error}",
                                cause=f"generation failed ({type(error).__name__})")
                ] * len(batch)
            for request, result in zip(batch, results):
                if not request.future.done():
                    request.future.set_result(result)

    # ------------------------------------------------------------------------------------ judge
    async def judge(self, image: Image.Image, checklist: Checklist) -> Verdict:
        style = self.cfg.prompt_style
        n_items = len(checklist.items)
        budget = max_output_tokens(n_items, style, self.cfg.max_output_tokens)
        picture = downscale(image, self.cfg.image_size)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": render_prompt(checklist, style)}]}]
        first = await self._generate(messages, picture, budget)
        if first.error is not None:  # no answer at all: an attempt, not a verdict
            raise JudgeCallError(f"judge {self.id}: {first.error}", cause=first.cause, requests=1)
        input_tokens, output_tokens, latency = first.input_tokens, first.output_tokens, first.seconds
        raw, requests = first.text, 1
        parsed = parse_answer(first.text, checklist, style)
        if parsed.status in ("failed", "partial"):
            repair_messages = messages + [
                {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                {"role": "user", "content": [{"type": "text", "text": render_repair(n_items, style)}]},
            ]
            second = await self._generate(repair_messages, picture, budget)
            requests += 1
            input_tokens += second.input_tokens
            output_tokens += second.output_tokens
            latency += second.seconds
            if second.error is None:
                raw += REPAIR_SEPARATOR + second.text
            parsed = after_repair(parsed, second.text if second.error is None else None, checklist, style)
        verdict = answer_verdict(parsed, checklist, self.cfg, raw, latency, input_tokens, output_tokens)
        verdict.requests = requests
        return verdict

