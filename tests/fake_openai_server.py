"""A real HTTP server on loopback that speaks the OpenAI chat-completions protocol, with injectable faults.

Used by the judge tests, the judge-stage end-to-end test and `benchmarks/bench_judge.py`:

    with FakeChatServer(latency_s=0.2) as server:
        cfg = JudgeConfig(base_url=server.base_url, ...)
        server.script(Fault("rate_limit", retry_after="3"), image_key=key)   # next call for that image
        ...
        server.calls[key]        # HTTP requests that carried that image (faulty ones included)

Answers come from `answer(request) -> str` (default: a deterministic list from the image's key, see
`default_items`); pass e.g. a function that runs the rules judge to make the server answer like it.
Faults are consumed in order, per image first, then from the global queue:

    rate_limit      429 with a Retry-After header (`retry_after`, default "0")
    server_error    500
    slow            waits `delay_s` before answering normally (longer than the client's timeout: a timeout)
    hang            waits `delay_s`, then closes the connection without a response (a timeout never answered)
    drop            closes the connection without a response
    malformed       200 with a body that is not JSON
    prose           the answer wrapped in prose ("After looking at the image ... [1, 0, 1] ... ")
    unparseable     prose with no verdicts
    refusal         a refusal in the message text
    refusal_field   a refusal in message.refusal (structured outputs), content null
    short           a list two items short
    reject_response_format   400 naming response_format when the request has one (else answers normally)
    reject_max_tokens        400 asking for max_completion_tokens when the request has max_tokens
    reject_temperature       400 saying temperature = 0 is unsupported when the request has a temperature
    unauthorized    401 echoing the Authorization header (the client must scrub it)
    forbidden       403 (the key may not use the model)
    model_not_found 404 with OpenAI's model_not_found body
    quota           429 with OpenAI's insufficient_quota body and no Retry-After
    bad_gateway     502
    bad_request     400 for another reason

`inject(rate, kinds, seed)` adds random faults: after the scripted ones, each request draws one of `kinds` with
probability `rate` (a seeded generator, so a single-threaded sequence of requests is reproducible).
`FakeChatServer(port=...)` binds a chosen port, so a test can start the server where a judge already failed
to connect.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image

FAULT_KINDS = (
    "rate_limit", "server_error", "slow", "drop", "malformed", "prose", "unparseable", "refusal", "refusal_field",
    "short", "reject_response_format", "reject_max_tokens", "unauthorized", "bad_request",
    "hang", "reject_temperature", "forbidden", "model_not_found", "quota", "bad_gateway",
)


@dataclass
class Fault:
    kind: str
    retry_after: str = "0"  # rate_limit: seconds or an HTTP date
    delay_s: float = 5.0  # slow
    text: str | None = None  # prose / unparseable / refusal: the text to answer

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")


@dataclass
class ChatRequest:
    """What the server understood of one request."""

    body: dict
    prompt: str  # text of the first user message
    last_text: str  # text of the last user message (the repair message on a repair call)
    image: Image.Image | None
    image_key: str | None
    n_items: int  # numbered criteria in the prompt
    is_repair: bool
    authorization: str | None


@dataclass
class RequestRecord:
    image_key: str | None
    is_repair: bool
    has_response_format: bool
    has_image: bool
    n_items: int
    authorization: str | None
    fault: str | None


def image_key(image: Image.Image) -> str:
    """Key of an image by its pixels (the same before and after a PNG round trip)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:16]


def default_items(key: str, n_items: int) -> list[int]:
    """The default answer for an image: bits of its key, so each image has its own, reproducible verdict."""
    bits = bin(int(key, 16))[2:].zfill(64)
    return [int(bits[index % len(bits)]) for index in range(n_items)]


def default_answer(request: ChatRequest) -> str:
    items = default_items(request.image_key or "0", request.n_items)
    if '"items"' in request.prompt:  # the structured prompt style asks for {"items": [...]}
        return json.dumps({"items": [{"item": i + 1, "verdict": v, "reason": "seen"} for i, v in enumerate(items)]})
    return json.dumps(items)


def answer_like(grader, checklists) -> Callable[[ChatRequest], str]:
    """An `answer` hook that grades like a local judge (`grader.grade(image, checklist) -> Verdict`, e.g. the
    rules judge): the checklist is the one whose display name the prompt says the image is meant to show."""
    by_name = {checklist.display_name: checklist for checklist in checklists.conditions}

    def answer(request: ChatRequest) -> str:
        checklist = next(c for name, c in by_name.items() if f"meant to show {name}." in request.prompt)
        return json.dumps(grader.grade(request.image.convert("RGB"), checklist).items)

    return answer


def _count_items(prompt: str) -> int:
    return len(re.findall(r"^\d+\. ", prompt, flags=re.MULTILINE))


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _image_of(messages: list[dict]) -> Image.Image | None:
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part["image_url"]["url"]
                data = base64.b64decode(url.split(",", 1)[1])
                image = Image.open(io.BytesIO(data))
                image.load()
                return image
    return None


class FakeChatServer:
    def __init__(
        self,
        answer: Callable[[ChatRequest], str] | None = None,
        latency_s: float = 0.0,
        record_requests: bool = True,
        port: int = 0,
    ) -> None:
        self.answer = answer or default_answer
        self.latency_s = latency_s
        self.port = port
        self._random_rate = 0.0
        self._random_kinds: tuple[str, ...] = ()
        self._random = random.Random(0)
        self.record_requests = record_requests
        self.calls: Counter[str] = Counter()  # HTTP requests per image key
        self.answers: Counter[str] = Counter()  # 200 answers per image key
        self.requests: list[RequestRecord] = []
        self.total_calls = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._global: deque[Fault] = deque()
        self._per_image: dict[str, deque[Fault]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ control
    def script(self, *faults: Fault | str, image_key: str | None = None) -> None:
        """Queue faults for the next requests (for one image, or any request when image_key is None)."""
        queue = self._global if image_key is None else self._per_image.setdefault(image_key, deque())
        with self._lock:
            queue.extend(fault if isinstance(fault, Fault) else Fault(fault) for fault in faults)

    def inject(self, rate: float, kinds: tuple[str, ...] = (), seed: int = 0) -> None:
        """Random faults from now on: each request after the scripted faults is one of `kinds` with
        probability `rate` (0 turns them off)."""
        unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; expected some of {FAULT_KINDS}")
        with self._lock:
            self._random_rate, self._random_kinds, self._random = rate, tuple(kinds), random.Random(seed)

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._global) + sum(len(queue) for queue in self._per_image.values())

    def _next_fault(self, key: str | None) -> Fault | None:
        with self._lock:
            queue = self._per_image.get(key) if key is not None else None
            if queue:
                return queue.popleft()
            if self._global:
                return self._global.popleft()
            if self._random_kinds and self._random.random() < self._random_rate:
                return Fault(self._random.choice(self._random_kinds), delay_s=30.0)
            return None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeChatServer":
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = _QuietServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes slow responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeChatServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- handling
    def handle(self, request: ChatRequest) -> tuple[int, dict[str, str], bytes | None, str | None]:
        """(status, headers, body or None to drop the connection, fault kind)."""
        fault = self._next_fault(request.image_key)
        kind = fault.kind if fault else None
        if self.latency_s:
            self._stopping.wait(self.latency_s)
        if kind == "slow":
            self._stopping.wait(fault.delay_s)
        if kind == "hang":
            self._stopping.wait(fault.delay_s)
        if kind in ("drop", "hang"):
            return 0, {}, None, kind
        if kind == "rate_limit":
            return 429, {"Retry-After": fault.retry_after}, _error_body("Rate limit reached, slow down."), kind
        if kind == "server_error":
            return 500, {}, _error_body("The server had an error while processing your request."), kind
        if kind == "unauthorized":
            return 401, {}, _error_body(f"Incorrect API key provided: {request.authorization}"), kind
        if kind == "forbidden":
            return 403, {}, _error_body("You are not allowed to use this model with this key.", "permission_denied"), kind
        if kind == "model_not_found":
            model = request.body.get("model", "")
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, {}, _error_body(message, "model_not_found"), kind
        if kind == "quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            return 429, {}, _error_body(message, "insufficient_quota"), kind
        if kind == "bad_gateway":
            return 502, {}, _error_body("Bad gateway."), kind
        if kind == "reject_temperature" and "temperature" in request.body:
            message = "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) value is supported."
            return 400, {}, _error_body(message, "unsupported_value", param="temperature"), kind
        if kind == "bad_request":
            return 400, {}, _error_body("Invalid image: could not process the image."), kind
        if kind == "reject_response_format" and "response_format" in request.body:
            return 400, {}, _error_body("response_format of type json_schema is not supported by this model"), kind
        if kind == "reject_max_tokens" and "max_tokens" in request.body:
            return 400, {}, _error_body("Unsupported parameter: 'max_tokens'. Use 'max_completion_tokens' instead."), kind
        if kind == "malformed":
            return 200, {"Content-Type": "application/json"}, b'{"choices": [{"message": {"content": "[1, 0', kind
        refusal = None
        if kind == "refusal_field":
            content, refusal = None, "I'm sorry, I can't help with that request."
        elif kind == "refusal":
            content = fault.text or "I'm sorry, but I can't help with medical assessments of skin images."
        elif kind == "unparseable":
            content = fault.text or "The image shows an area of reddish skin; it is hard to say more."
        elif kind == "short":
            content = json.dumps(default_items(request.image_key or "0", max(1, request.n_items - 2)))
        else:
            content = self.answer(request)
            if kind == "prose":
                content = fault.text or f"After looking at the image closely, here is my grading: {content}. Hope it helps."
        usage = {
            "prompt_tokens": len(request.prompt) // 4 + (255 if request.image is not None else 0),
            "completion_tokens": max(1, len(content or refusal or "") // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        body = {
            "id": f"chatcmpl-{self.total_calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.body.get("model", "fake"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode(), kind


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that timed out closes its socket before a slow answer is written; that is the test's point.
        pass


def _error_body(message: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"Content-Type": "application/json"}, json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode())
        else:
            self._send(404, {}, _error_body("not found"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {}, _error_body(f"no route {self.path}"))
            return
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            self._send(400, {}, _error_body("request body is not a chat completion request"))
            return
        image = _image_of(messages)
        key = image_key(image) if image is not None else None
        user_texts = [_text_of(message) for message in messages if message.get("role") == "user"]
        request = ChatRequest(
            body=body,
            prompt=user_texts[0] if user_texts else "",
            last_text=user_texts[-1] if user_texts else "",
            image=image,
            image_key=key,
            n_items=_count_items(user_texts[0] if user_texts else ""),
            is_repair=len(messages) > 1,
            authorization=self.headers.get("Authorization"),
        )
        owner = self.owner
        with owner._lock:
            owner.total_calls += 1
            owner.calls[key or "-"] += 1
            owner.in_flight += 1
            owner.peak_in_flight = max(owner.peak_in_flight, owner.in_flight)
        try:
            status, headers, payload, kind = owner.handle(request)
        finally:
            with owner._lock:
                owner.in_flight -= 1
        with owner._lock:
            if status == 200 and kind != "malformed":
                owner.answers[key or "-"] += 1
            if owner.record_requests:
                owner.requests.append(
                    RequestRecord(key, request.is_repair, "response_format" in body, image is not None, request.n_items, request.authorization, kind)
                )
        if payload is None:  # drop: close without a byte of response
            self.close_connection = True
            return
        self._send(status, headers, payload)

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
