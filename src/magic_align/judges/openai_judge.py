"""A judge behind any OpenAI-compatible chat-completions endpoint with image input.

GPT-4o by default; vLLM, Ollama, llama.cpp server and LM Studio through `judge.base_url`. The HTTP layer is
httpx; tenacity runs the attempts, with the policy decided here (what is retried, how long to wait):

- at most `judge.concurrency` images in flight (one semaphore slot per image, repair included);
- `requests_per_minute` and `tokens_per_minute` limits: leaky buckets (aiolimiter), the token bucket charged
  with an estimate of each request (prompt text + image tiles + max output tokens), as OpenAI counts them;
- retries on 429, 408/409, 5xx, timeouts, dropped connections and malformed response bodies, with
  exponential backoff and jitter, honouring `Retry-After` (seconds or an HTTP date), up to `max_retries`;
- a server that rejects a request parameter with HTTP 400 gets the request again without it and this judge
  remembers: `response_format` (structured style) is dropped, `max_tokens` becomes `max_completion_tokens`,
  `temperature` is left to the server's default (newer reasoning models accept no other value);
- a call that gets no answer after every retry raises `JudgeCallError` (never a verdict: the stage records an
  attempt and the image stays to be asked again);
- 401, 403, 404 (and a 400 naming the model as unknown) and a 429 that says the quota is exhausted raise
  `JudgeEndpointError` at once, without retries, and every later call of this judge raises the same error
  without a request: every call would fail the same way (wrong key, model or URL, no credit);
- an answer the model gave is a `Verdict`: one that cannot be read after one repair message is `failed`,
  a refusal `refused`; another 4xx rejection of one request (an image the server will not take) is a
  `failed` verdict for that image.

The API key is read from the environment variable named by `judge.api_key_env`; it is sent in the
Authorization header only and never stored in reprs, logs, errors or verdicts. A judge without the key it
needs can still be built (a dry run, or a later stage that only needs the judge's id); its first call raises.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from aiolimiter import AsyncLimiter
from PIL import Image
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from magic_align.checklists.schema import Checklist
from magic_align.config import JudgeConfig
from magic_align.judges.base import JudgeCallError, Verdict
from magic_align.judges.costs import cost_usd, estimate_image_tokens, estimate_text_tokens
from magic_align.judges.parsing import ParsedAnswer, no_answer, parse_answer
from magic_align.judges.privacy import OPENAI_API_URL, check_endpoint, is_loopback_url, png_data_url, prepare_image
from magic_align.judges.prompts import prompt_version, render_prompt, render_repair, response_format

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529})
RETRY_AFTER_CEILING_S = 600.0  # a server asking for more than this is not honoured beyond it
REPAIR_SEPARATOR = "\n\n[repair answer]\n"


class JudgeEndpointError(JudgeCallError):
    """The endpoint refuses every request (wrong key, model or URL, exhausted quota); grading cannot go on."""

    def __init__(self, message: str, *, cause: str | None = None, requests: int = 0):
        super().__init__(message, cause=cause, requests=requests, systematic=True)


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


def error_fields(text: str) -> tuple[str, str, str]:
    """(message, param, code) of an error body such as OpenAI's {"error": {"message", "param", "code"}};
    the raw text as the message when the body is not that shape."""
    try:
        data = json.loads(text)
    except ValueError:
        return text, "", ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        return error, "", ""
    if not isinstance(error, dict):
        return text, "", ""
    return str(error.get("message") or text), str(error.get("param") or ""), str(error.get("code") or error.get("type") or "")


_UNKNOWN_MODEL = re.compile(r"model\b.{0,120}?\b(does not exist|not found|not exist|unknown|no such|not available)")


def systematic_failure(status: int, text: str, retry_after: str | None = None) -> str | None:
    """What an HTTP error says about every later call: "key" (401), "access" (403), "model" (404, or 400, naming
    the model as unknown), "url" (another 404), "quota" (402, or a 429 saying the quota or credit is exhausted,
    OpenAI's `insufficient_quota`), or None when the next call may well succeed (rate limits, 5xx, a rejection of
    this one request). A 429 with a Retry-After header is a rate limit whatever its text: the server says when
    to come back."""
    message, _, code = error_fields(text)
    lowered = f"{code} {message}".lower()
    if status == 429:
        if retry_after is not None and retry_after.strip():
            return None
        exhausted = "insufficient_quota" in lowered or ("quota" in lowered and ("billing" in lowered or "credit" in lowered))
        return "quota" if exhausted else None
    if status == 401:
        return "key"
    if status == 403:
        return "access"
    if status in (400, 404) and ("model_not_found" in lowered or _UNKNOWN_MODEL.search(lowered)):
        return "model"
    if status == 404:
        return "url"
    if status == 402:
        return "quota"
    return None


# ------------------------------------------------------------------------------------------- judge
@dataclass
class _Reply:
    content: str | None = None
    refusal: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # the request was rejected (a 4xx other than the systematic ones); content is None
    requests: int = 0  # HTTP requests made for this reply (retries and resent adapted requests included)


@dataclass
class _Call:
    """One chat completion across its attempts: the request body (adapted in place) and the requests made."""

    body: dict
    estimate: int  # tokens charged to the token bucket per request
    requests: int = 0


class _NoAnswer(Exception):
    """An attempt that got no answer (timeout, dropped connection, 429/5xx, malformed body): worth a retry."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


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
        # Every later call raises this once set: a missing key now, a rejected key or unknown model later.
        self._fatal: JudgeEndpointError | None = None
        if self._api_key is None and not is_loopback_url(self.base_url):
            self._fatal = JudgeEndpointError(
                f"the environment variable {cfg.api_key_env} (judge.api_key_env) is not set; "
                f"the judge at {self.base_url} needs an API key",
                cause="no API key",
            )
        self.id = f"openai:{cfg.model}@{parts.netloc}"
        self.prompt_version = prompt_version(cfg.prompt_style)
        self._use_response_format = cfg.prompt_style == "structured"
        self._max_tokens_key = "max_tokens"  # becomes max_completion_tokens if the server asks for it
        self._send_temperature = True  # False once the server rejected temperature = 0
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

    def check_ready(self) -> None:
        """Raise `JudgeEndpointError` when no call can succeed (no API key); the stage asks before any call."""
        if self._fatal is not None:
            raise self._fatal

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
        """One chat completion with retries: the reply, or a rejected request as `_Reply.error`; raises
        `JudgeCallError` when no answer came after every retry, `JudgeEndpointError` when none ever will."""
        if self._fatal is not None:
            raise self._fatal
        style = self.cfg.prompt_style
        body: dict = {
            "model": self.cfg.model,
            "messages": messages,
            self._max_tokens_key: max_output_tokens(n_items, style, self.cfg.max_output_tokens),
        }
        if self._send_temperature:
            body["temperature"] = 0
        if self._use_response_format:
            body["response_format"] = response_format(style)
        estimate = estimate_request_tokens(messages, self.cfg.image_size) + body[self._max_tokens_key]
        call = _Call(body=body, estimate=estimate)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=self._retry_wait,
            retry=retry_if_exception_type(_NoAnswer),  # systematic failures and answers are never retried
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return await retrying(self._attempt, state, call)
        except _NoAnswer as failure:
            raise JudgeCallError(
                f"no answer from {self.base_url} after {self.cfg.max_retries + 1} attempt(s): {failure.reason}",
                cause=failure.reason,
                requests=call.requests,
            ) from None

    async def _attempt(self, state: _LoopState, call: _Call) -> _Reply:
        """One attempt: the reply, a rejected request as `_Reply.error`, or `_NoAnswer` (worth retrying). A
        request the judge adapts to the server's rejection is sent again within the same attempt."""
        url = f"{self.base_url}/chat/completions"
        while True:
            if state.requests is not None:
                await state.requests.acquire()
            if state.tokens is not None:
                await state.tokens.acquire(min(call.estimate, self.cfg.tokens_per_minute))
            call.requests += 1
            try:
                response = await state.client.post(url, json=call.body, headers=self._headers())
            except httpx.TimeoutException:
                raise _NoAnswer(f"timed out after {self.cfg.timeout_s:g} s") from None
            except httpx.TransportError as error:
                raise _NoAnswer(f"connection error ({type(error).__name__})") from None
            status = response.status_code
            if status == 200:
                reply = self._read_reply(response)
                if reply is None:
                    raise _NoAnswer("malformed response body (not a chat completion)")
                reply.requests = call.requests
                return reply
            if status == 400 and self._adapt_to_rejection(call.body, response.text):
                continue  # the request changed shape; not a failure of the call, so no retry is used up
            retry_after = response.headers.get("retry-after")
            if (kind := systematic_failure(status, response.text, retry_after)) is not None:
                if self._fatal is None:
                    self._fatal = self._endpoint_error(kind, status, response.text, call.requests)
                raise self._fatal
            if status in RETRYABLE_STATUS:
                raise _NoAnswer(f"HTTP {status}", parse_retry_after(retry_after))
            return _Reply(error=f"HTTP {status}: {self._scrub(response.text)}", requests=call.requests)

    def _retry_wait(self, retry_state: RetryCallState) -> float:
        if retry_state.attempt_number > self.cfg.max_retries:
            return 0.0  # tenacity asks before it stops: no retry follows, so no jitter is drawn
        failure = retry_state.outcome.exception()
        return retry_delay(retry_state.attempt_number - 1, failure.retry_after, self.cfg.retry_base_s,
                           self.cfg.retry_max_s, self._rng)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        logger.info("%s: %s; retry %d/%d in %.2f s", self.id, retry_state.outcome.exception().reason,
                    retry_state.attempt_number, self.cfg.max_retries, retry_state.upcoming_sleep)

    def _endpoint_error(self, kind: str, status: int, text: str, requests: int) -> JudgeEndpointError:
        """The one line that says which setting to check (see `systematic_failure` for the kinds)."""
        detail = self._scrub(error_fields(text)[0])[:200]
        cfg, where = self.cfg, self.base_url
        messages = {
            "key": (f"judge at {where} rejected the API key (HTTP {status}: {detail!r}); check that "
                    f"{cfg.api_key_env} (judge.api_key_env) holds a valid key", "API key rejected"),
            "access": (f"judge at {where} denied access (HTTP {status}: {detail!r}); check the key's permissions "
                       f"for judge.model = {cfg.model!r}", "access denied"),
            "model": (f"judge model {cfg.model!r} not found at {where} (HTTP {status}: {detail!r}); check judge.model",
                      "model not found"),
            "url": (f"{where}/chat/completions not found (HTTP {status}: {detail!r}); check judge.base_url "
                    "(OpenAI-compatible servers usually end in /v1)", "URL not found"),
            "quota": (f"judge at {where}: quota exhausted (HTTP {status}: {detail!r}); check the account's plan and "
                      "billing, then rerun to continue", "quota exhausted"),
        }
        message, cause = messages[kind]
        return JudgeEndpointError(message, cause=cause, requests=requests)

    def _adapt_to_rejection(self, body: dict, text: str) -> bool:
        """Drop or rename a request parameter the server says it does not support; True when the body changed.

        Servers without JSON-schema support get the JSON asked for in the prompt text only (once; the judge
        remembers). Newer OpenAI models want `max_completion_tokens` instead of `max_tokens`, and reasoning
        models accept only their default temperature: it is then left out, so answers may vary between calls.
        """
        message, param, _ = error_fields(text)
        lowered = f"{param} {message}".lower()
        if "response_format" in body and ("response_format" in lowered or "json_schema" in lowered or "response format" in lowered):
            logger.warning("%s rejects response_format; asking for JSON in the prompt text only", self.id)
            self._use_response_format = False
            del body["response_format"]
            return True
        if "max_tokens" in body and "max_completion_tokens" in lowered:
            self._max_tokens_key = "max_completion_tokens"
            body["max_completion_tokens"] = body.pop("max_tokens")
            return True
        if "temperature" in body and (param == "temperature" or "temperature" in lowered):
            logger.warning("%s rejects temperature = 0; asking with the server's default temperature", self.id)
            self._send_temperature = False
            del body["temperature"]
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
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return _Reply(
            content=content if isinstance(content, str) else None,
            refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else None,
            input_tokens=_token_count(usage.get("prompt_tokens")),
            output_tokens=_token_count(usage.get("completion_tokens")),
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
            reply = await self._complete(state, messages, n_items)  # no answer at all: JudgeCallError
            input_tokens, output_tokens, requests = reply.input_tokens, reply.output_tokens, reply.requests
            raw = reply.content or reply.refusal or ""
            if reply.error is not None:
                parsed = no_answer(n_items, "failed", reply.error)
            elif reply.refusal is not None and not reply.content:
                parsed = no_answer(n_items, "refused", f"refusal: {reply.refusal[:200]}")
            else:
                parsed = parse_answer(reply.content, checklist, style)
                if parsed.status in ("failed", "partial"):
                    messages.append({"role": "assistant", "content": reply.content or ""})
                    messages.append({"role": "user", "content": render_repair(n_items, style)})
                    try:
                        repair = await self._complete(state, messages, n_items)
                    except JudgeCallError as error:
                        # the first answer was paid for and is kept; a systematic error stops the next call
                        repair = _Reply(error=f"repair call failed: {error}", requests=error.requests)
                    input_tokens += repair.input_tokens
                    output_tokens += repair.output_tokens
                    requests += repair.requests
                    if repair.error is None:
                        raw += REPAIR_SEPARATOR + (repair.content or repair.refusal or "")
                    parsed = after_repair(parsed, repair.content if repair.error is None else None, checklist, style)
            latency = time.perf_counter() - started
        verdict = answer_verdict(parsed, checklist, self.cfg, raw, latency, input_tokens, output_tokens)
        verdict.requests = requests
        return verdict


def _token_count(value: object) -> int:
    """A usage count as the server gave it; an odd one ("abc", a list) counts 0 rather than losing the paid
    answer it came with."""
    try:
        return max(0, int(float(value))) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def better_answer(first: ParsedAnswer, second: ParsedAnswer) -> ParsedAnswer:
    """The more useful of an answer and its repair: more known items wins, the repair on a tie."""
    def known(parsed: ParsedAnswer) -> int:
        return sum(value is not None for value in parsed.items) if parsed.status in ("ok", "partial") else -1

    return second if known(second) >= known(first) else first


def after_repair(parsed: ParsedAnswer, repair_text: str | None, n_items: int | Checklist, style: str) -> ParsedAnswer:
    """The answer once the one repair message was tried: the better of both (`repair_text` None: the repair
    call failed), with an error that says a repair was tried when it is still unreadable. Give the checklist
    for `n_items` so lines naming aspects are read (`parse_answer`)."""
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
