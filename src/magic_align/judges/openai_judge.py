"""A judge behind any OpenAI-compatible chat-completions endpoint with image input.

GPT-4o by default; vLLM, Ollama, llama.cpp server and LM Studio through `judge.base_url`. The HTTP layer is
httpx, written out here so retries are exactly what we want:

- at most `judge.concurrency` images in flight (one semaphore slot per image, repair included);
- `requests_per_minute` and `tokens_per_minute` limits: leaky buckets (aiolimiter), the token bucket charged
  with an estimate of each request (prompt text + image tiles + max output tokens), as OpenAI counts them;
- retries on 429, 408/409, 5xx, timeouts, dropped connections and malformed response bodies, with
  exponential backoff and jitter, honouring `Retry-After` (seconds or an HTTP date), up to `max_retries`;
- a server that rejects `response_format` (structured style) is asked again without it, once, and never
  again by this judge;
- 401/403/404 raise `JudgeEndpointError` (every call would fail the same way: wrong key, model or URL);
  any other problem with one image, including an answer that cannot be read after one repair message,
  comes back as a failed or refused `Verdict` with `error` set and never raises.

The API key is read from the environment variable named by `judge.api_key_env`; it is sent in the
Authorization header only and never stored in reprs, logs, errors or verdicts.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from aiolimiter import AsyncLimiter
from PIL import Image

from magic_align.checklists.schema import Checklist
from magic_align.config import JudgeConfig
from magic_align.judges.base import Verdict
from magic_align.judges.costs import cost_usd, estimate_image_tokens, estimate_text_tokens
from magic_align.judges.parsing import ParsedAnswer, no_answer, parse_answer
from magic_align.judges.privacy import OPENAI_API_URL, check_endpoint, is_loopback_url, png_data_url, prepare_image
from magic_align.judges.prompts import prompt_version, render_prompt, render_repair, response_format
from magic_align.errors import MagicError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529})
FATAL_STATUS = frozenset({401, 403, 404})
RETRY_AFTER_CEILING_S = 600.0  # a server asking for more than this is not honoured beyond it
REPAIR_SEPARATOR = "\n\n[repair answer]\n"


class JudgeEndpointError(MagicError, RuntimeError):
    """The endpoint refuses every request (wrong key, model or URL); grading cannot go on."""


# ------------------------------------------------------------------------------------- pure helpers
def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds ("7", "1.5") or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, moment.timestamp() - now)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so callers spread out."""
    step = min(max_s, base_s * (2**attempt))
    return step / 2 + rng.uniform(0, step / 2)


def retry_delay(attempt: int, retry_after: float | None, base_s: float, max_s: float, rng: random.Random) -> float:
    if retry_after is not None:
        # The server knows when it will take us again; a little jitter keeps concurrent callers apart.
        return min(retry_after, RETRY_AFTER_CEILING_S) + rng.uniform(0, min(1.0, base_s))
    return backoff_delay(attempt, base_s, max_s, rng)


def max_output_tokens(n_items: int, style: str, configured: int | None = None) -> int:
    """The answer budget (`judge.max_output_tokens` when set): by default room for prose around a list, or a
    sentence per item in the structured style."""
    if configured is not None:
        return configured
    return 256 if style == "paper" else 64 + 96 * n_items


def estimate_request_tokens(messages: list[dict], image_size: int) -> int:
    """Input tokens of a chat request: its text parts, and each image as a square of `image_size` (the upper
    bound of the image as sent)."""
    total = 0
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            if part.get("type") == "text":
                total += estimate_text_tokens(part["text"])
            else:
                total += estimate_image_tokens(image_size, image_size)
    return total


# ------------------------------------------------------------------------------------------- judge
@dataclass
class _Reply:
    content: str | None = None
    refusal: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # the call failed (after retries); content is None


@dataclass
class _LoopState:
    """Everything bound to one event loop (httpx client, semaphore, limiters)."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    slots: asyncio.Semaphore
    requests: AsyncLimiter | None
    tokens: AsyncLimiter | None


class OpenAIJudge:
    """`Judge` over an OpenAI-compatible chat-completions endpoint (see the module docstring)."""

    def __init__(
        self,
        cfg: JudgeConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.base_url = (cfg.base_url or OPENAI_API_URL).rstrip("/")
        check_endpoint(self.base_url, cfg.allow_remote)
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"judge.base_url = {self.base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        self._api_key = os.environ.get(cfg.api_key_env) or None
        if self._api_key is None and not is_loopback_url(self.base_url):
            raise ValueError(
                f"the environment variable {cfg.api_key_env} (judge.api_key_env) is not set; "
                f"the judge at {self.base_url} needs an API key"
            )
        self.id = f"openai:{cfg.model}@{parts.netloc}"
        self.prompt_version = prompt_version(cfg.prompt_style)
        self._use_response_format = cfg.prompt_style == "structured"
        self._max_tokens_key = "max_tokens"  # becomes max_completion_tokens if the server asks for it
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._state: _LoopState | None = None

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"OpenAIJudge(id={self.id!r}, style={self.cfg.prompt_style!r}, concurrency={self.cfg.concurrency})"

    # ---------------------------------------------------------------------------------- plumbing
    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            cfg = self.cfg
            limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
            self._state = _LoopState(
                loop=loop,
                client=httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits),
                slots=asyncio.Semaphore(cfg.concurrency),
                requests=AsyncLimiter(cfg.requests_per_minute, 60) if cfg.requests_per_minute else None,
                tokens=AsyncLimiter(cfg.tokens_per_minute, 60) if cfg.tokens_per_minute else None,
            )
        return self._state

    async def aclose(self) -> None:
        if self._state is not None and self._state.loop is asyncio.get_running_loop():
            await self._state.client.aclose()
        self._state = None

    def prompt_text(self, checklist: Checklist) -> str:
        return render_prompt(checklist, self.cfg.prompt_style)

    async def __aenter__(self) -> "OpenAIJudge":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def _scrub(self, text: str) -> str:
        """Server messages may echo the key (some proxies do); never let it through."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:500]

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    # ------------------------------------------------------------------------------------ calls
    async def _complete(self, state: _LoopState, messages: list[dict], n_items: int) -> _Reply:
        """One chat completion with retries; returns the reply or why it failed."""
        style = self.cfg.prompt_style
        body: dict = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": 0,
            self._max_tokens_key: max_output_tokens(n_items, style, self.cfg.max_output_tokens),
        }
        if self._use_response_format:
            body["response_format"] = response_format(style)
        estimate = estimate_request_tokens(messages, self.cfg.image_size) + body[self._max_tokens_key]
        url = f"{self.base_url}/chat/completions"
        reason = "no attempt made"
        attempt = 0
        while attempt <= self.cfg.max_retries:
            if state.requests is not None:
                await state.requests.acquire()
            if state.tokens is not None:
                await state.tokens.acquire(min(estimate, self.cfg.tokens_per_minute))
            retry_after: float | None = None
            try:
                response = await state.client.post(url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                reason = f"timed out after {self.cfg.timeout_s:g} s"
            except httpx.TransportError as error:
                reason = f"connection error ({type(error).__name__})"
            else:
                status = response.status_code
                if status == 200:
                    reply = self._read_reply(response)
                    if reply is not None:
                        return reply
                    reason = "malformed response body (not a chat completion)"
                elif status in FATAL_STATUS:
                    raise JudgeEndpointError(
                        f"{url} answered HTTP {status}: {self._scrub(response.text)!r}; check judge.api_key_env "
                        f"({self.cfg.api_key_env}), judge.model ({self.cfg.model!r}) and judge.base_url"
                    )
                elif status == 400 and self._adapt_to_rejection(body, response.text):
                    continue  # the request changed shape; not a failure of the call, so no retry is used up
                elif status in RETRYABLE_STATUS:
                    reason = f"HTTP {status}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                else:
                    return _Reply(error=f"HTTP {status}: {self._scrub(response.text)}")
            if attempt == self.cfg.max_retries:
                break
            delay = retry_delay(attempt, retry_after, self.cfg.retry_base_s, self.cfg.retry_max_s, self._rng)
            logger.info("%s: %s; retry %d/%d in %.2f s", self.id, reason, attempt + 1, self.cfg.max_retries, delay)
            await self._sleep(delay)
            attempt += 1
        return _Reply(error=f"gave up after {attempt + 1} attempt(s): {reason}")

    def _adapt_to_rejection(self, body: dict, text: str) -> bool:
        """Drop or rename a request parameter the server says it does not support; True when the body changed.

        Servers without JSON-schema support get the JSON asked for in the prompt text only (once; the judge
        remembers). Newer OpenAI models want `max_completion_tokens` instead of `max_tokens`.
        """
        lowered = text.lower()
        if "response_format" in body and ("response_format" in lowered or "json_schema" in lowered or "response format" in lowered):
            logger.warning("%s rejects response_format; asking for JSON in the prompt text only", self.id)
            self._use_response_format = False
            del body["response_format"]
            return True
        if "max_tokens" in body and "max_completion_tokens" in lowered:
            self._max_tokens_key = "max_completion_tokens"
            body["max_completion_tokens"] = body.pop("max_tokens")
            return True
        return False

    @staticmethod
    def _read_reply(response: httpx.Response) -> _Reply | None:
        try:
            data = response.json()
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        usage = data.get("usage") or {}
        return _Reply(
            content=content if isinstance(content, str) else None,
            refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else None,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )

    # ------------------------------------------------------------------------------------ judge
    async def judge(self, image: Image.Image, checklist: Checklist) -> Verdict:
        state = self._loop_state()
        n_items = len(checklist.items)
        style = self.cfg.prompt_style
        async with state.slots:
            started = time.perf_counter()
            png = await asyncio.to_thread(prepare_image, image, self.cfg.image_size)
            messages: list[dict] = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": render_prompt(checklist, style)},
                        {"type": "image_url", "image_url": {"url": png_data_url(png)}},
                    ],
                }
            ]
            del png
            reply = await self._complete(state, messages, n_items)
            input_tokens, output_tokens = reply.input_tokens, reply.output_tokens
            raw = reply.content or reply.refusal or ""
            if reply.error is not None:
                parsed = no_answer(n_items, "failed", reply.error)
            elif reply.refusal is not None and not reply.content:
                parsed = no_answer(n_items, "refused", f"refusal: {reply.refusal[:200]}")
            else:
                parsed = parse_answer(reply.content, n_items, style)
                if parsed.status in ("failed", "partial"):
                    messages.append({"role": "assistant", "content": reply.content or ""})
                    messages.append({"role": "user", "content": render_repair(n_items, style)})
                    repair = await self._complete(state, messages, n_items)
                    input_tokens += repair.input_tokens
                    output_tokens += repair.output_tokens
                    if repair.error is None:
                        raw += REPAIR_SEPARATOR + (repair.content or repair.refusal or "")
                    parsed = after_repair(parsed, repair.content if repair.error is None else None, n_items, style)
            latency = time.perf_counter() - started
        return answer_verdict(parsed, checklist, self.cfg, raw, latency, input_tokens, output_tokens)


def better_answer(first: ParsedAnswer, second: ParsedAnswer) -> ParsedAnswer:
    """The more useful of an answer and its repair: more known items wins, the repair on a tie."""
    def known(parsed: ParsedAnswer) -> int:
        return sum(value is not None for value in parsed.items) if parsed.status in ("ok", "partial") else -1

    return second if known(second) >= known(first) else first


def after_repair(parsed: ParsedAnswer, repair_text: str | None, n_items: int, style: str) -> ParsedAnswer:
    """The answer once the one repair message was tried: the better of both (`repair_text` None: the repair
    call failed), with an error that says a repair was tried when it is still unreadable."""
    if repair_text is not None:
        parsed = better_answer(parsed, parse_answer(repair_text, n_items, style))
    if parsed.status == "failed":
        parsed.error = f"unreadable answer, also after one repair message: {parsed.error}"
    return parsed


def answer_verdict(parsed: ParsedAnswer, checklist: Checklist, cfg: JudgeConfig, raw: str, latency_s: float,
                   input_tokens: int, output_tokens: int) -> Verdict:
    """The `Verdict` of a parsed answer (every chat judge's last step): the checklist's `requires` applied to a
    readable answer, the cost at the configured price."""
    items = checklist.apply_requires(parsed.items) if parsed.status in ("ok", "partial") else parsed.items
    return Verdict(
        items=items,
        rationales=parsed.rationales,
        raw=raw,
        parse_status=parsed.status,
        latency_s=latency_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd(cfg, input_tokens, output_tokens),
        error=parsed.error,
    )
