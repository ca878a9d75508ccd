"""The OpenAI-compatible judge against a real loopback HTTP server that injects faults."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import logging
import random
import time

import pytest
from PIL import Image, PngImagePlugin

from checklist_builders import gated_checklist
from fake_openai_server import ChatRequest, FakeChatServer, Fault, answer_like, default_items, image_key
from magic_align.checklists.schema import Checklist, ChecklistItem
from magic_align.config import JudgeConfig, Price
from magic_align.judges.base import JudgeCallError
from magic_align.judges.openai_judge import (
    JudgeEndpointError,
    OpenAIJudge,
    backoff_delay,
    estimate_image_tokens,
    parse_retry_after,
    systematic_failure,
)
from magic_align.judges.privacy import PrivacyError, check_may_send, is_loopback_url, may_send
from magic_align.judges.prompts import prompt_version, render_prompt

CHECKLIST = Checklist(
    condition="psoriasis",
    display_name="Psoriasis",
    token="<psoriasis>",
    items=tuple(
        ChecklistItem(id=name, aspect=name, text=f"The {name} matches psoriasis.")
        for name in ("location", "lesion", "shape", "color", "texture")
    ),
)
GATED = gated_checklist(
    "acne",
    ("lesion", "lesion", "A lesion is visible."),
    ("color", "color", "The lesion is red."),
    ("site", "location", "On the face."),
)
KEY_ENV = "MAGIC_TEST_JUDGE_KEY"


class SleepRecorder:
    """Stands in for asyncio.sleep: records the backoff delays instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def make_image(index: int, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), ((index * 37) % 256, (index * 91) % 256, (index * 53 + 7) % 256))
    image.putpixel((index % size, 0), (255 - index % 256, 0, index % 256))
    return image


def config(server: FakeChatServer, **overrides) -> JudgeConfig:
    values = dict(
        base_url=server.base_url,
        model="fake-model",
        api_key_env=KEY_ENV,
        max_retries=3,
        timeout_s=1.5,
        image_size=64,
        concurrency=4,
        prices={"fake-model": Price(input_per_mtok=2.0, output_per_mtok=8.0)},
    )
    values.update(overrides)
    return JudgeConfig(**values)


@pytest.fixture
def server():
    with FakeChatServer() as running:
        yield running


async def test_every_fault_ends_graded_or_explicitly_failed(server):
    scripts = {
        "none": [],
        "rate_limit": [Fault("rate_limit", retry_after="2")],
        "server_error": ["server_error", "server_error"],
        "slow": [Fault("slow", delay_s=30)],
        "hang": [Fault("hang", delay_s=30)],
        "drop": ["drop"],
        "bad_gateway": ["bad_gateway"],
        "malformed": ["malformed"],
        "prose": ["prose"],
        "unparseable_once": ["unparseable"],
        "unparseable_twice": ["unparseable", "unparseable"],
        "refusal": ["refusal"],
        "refusal_field": ["refusal_field"],
        "short_once": ["short"],
        "short_twice": ["short", "short"],
        "always_500": ["server_error"] * 4,  # max_retries = 3: four attempts, all fail
        "bad_request": ["bad_request"],
    }
    images = {name: make_image(index) for index, name in enumerate(scripts)}
    keys = {name: image_key(image) for name, image in images.items()}
    assert len(set(keys.values())) == len(keys)
    for name, faults in scripts.items():
        if faults:
            server.script(*faults, image_key=keys[name])
    sleep = SleepRecorder()
    judge = OpenAIJudge(config(server), sleep=sleep, rng=random.Random(0))
    try:
        outcomes = await asyncio.gather(*(judge.judge(images[name], CHECKLIST) for name in scripts), return_exceptions=True)
    finally:
        await judge.aclose()
    verdicts = dict(zip(scripts, outcomes))

    assert server.pending_faults() == 0
    # no answer after every retry: an error for the stage to record, never a verdict
    no_answer = verdicts.pop("always_500")
    assert isinstance(no_answer, JudgeCallError) and not no_answer.systematic
    assert "4 attempt" in str(no_answer) and no_answer.cause == "HTTP 500" and no_answer.requests == 4
    assert server.base_url in str(no_answer)
    for name, verdict in verdicts.items():
        expected = default_items(keys[name], 5)
        assert len(verdict.items) == 5
        if verdict.parse_status == "ok":
            assert verdict.items == expected, name
            assert verdict.error is None
        else:
            assert verdict.parse_status in ("partial", "failed", "refused"), name
            assert verdict.error, name
    graded = {"none", "rate_limit", "server_error", "slow", "hang", "drop", "bad_gateway", "malformed", "prose",
              "unparseable_once", "short_once"}
    for name in graded:
        assert verdicts[name].parse_status == "ok", (name, verdicts[name].error)
    assert verdicts["unparseable_twice"].parse_status == "failed"
    assert verdicts["unparseable_twice"].items == [None] * 5
    assert "repair" in verdicts["unparseable_twice"].error
    assert verdicts["refusal"].parse_status == "refused"
    assert verdicts["refusal_field"].parse_status == "refused"
    # a list of the wrong length twice is no verdict: a failed parse that says why
    assert verdicts["short_twice"].parse_status == "failed"
    assert verdicts["short_twice"].items == [None] * 5
    assert "wrong length 3 of 5" in verdicts["short_twice"].error
    # a request the server rejects for this image is an explicit failed verdict (asking again gives the same)
    assert verdicts["bad_request"].parse_status == "failed" and "HTTP 400" in verdicts["bad_request"].error

    # One HTTP request per fault that is retried or repaired, plus the answer that finally counted.
    expected_calls = {
        "none": 1, "rate_limit": 2, "server_error": 3, "slow": 2, "hang": 2, "drop": 2, "bad_gateway": 2,
        "malformed": 2, "prose": 1,
        "unparseable_once": 2, "unparseable_twice": 2, "refusal": 1, "refusal_field": 1, "short_once": 2,
        "short_twice": 2, "always_500": 4, "bad_request": 1,
    }
    assert {name: server.calls[keys[name]] for name in scripts} == expected_calls
    # each verdict counts the requests behind it: retries and the repair message included
    assert {name: verdict.requests for name, verdict in verdicts.items()} == {
        name: calls for name, calls in expected_calls.items() if name != "always_500"
    }
    # The repair keeps the raw text of both answers.
    assert "[repair answer]" in verdicts["unparseable_once"].raw
    # Retry-After: 2 was honoured (the recorded wait is at least 2 s); backoff waits are positive.
    assert any(delay >= 2.0 for delay in sleep.delays)
    assert all(delay > 0 for delay in sleep.delays)


async def test_retry_after_http_date_is_honoured(server):
    image = make_image(1)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.script(Fault("rate_limit", retry_after=when), image_key=image_key(image))
    sleep = SleepRecorder()
    judge = OpenAIJudge(config(server), sleep=sleep)
    verdict = await judge.judge(image, CHECKLIST)
    await judge.aclose()
    assert verdict.parse_status == "ok"
    assert len(sleep.delays) == 1 and 25 <= sleep.delays[0] <= 32


def test_parse_retry_after():
    now = 1_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after(email.utils.formatdate(now + 20, usegmt=True), now) == pytest.approx(20, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 20, usegmt=True), now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_backoff_is_exponential_with_jitter():
    rng = random.Random(1)
    for attempt in range(6):
        step = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
        assert all(step / 2 <= delay <= step for delay in delays)
        assert len(set(delays)) > 1  # jitter


def test_image_token_estimate_matches_openai_rules():
    assert estimate_image_tokens(512, 512) == 255
    assert estimate_image_tokens(1024, 1024) == 765
    assert estimate_image_tokens(2048, 4096) == 1105


def test_call_estimate_uses_prices():
    from magic_align.judge import estimate_call_tokens
    from magic_align.judges.costs import price_usd

    cfg = JudgeConfig(model="gpt-4o")
    input_tokens, output_tokens = estimate_call_tokens(None, CHECKLIST, 512, 512, cfg)
    assert input_tokens > 255 and output_tokens > 0
    assert price_usd(cfg, input_tokens, output_tokens) == pytest.approx(input_tokens * 2.5e-6 + output_tokens * 10e-6)
    assert price_usd(JudgeConfig(model="local-llava"), input_tokens, output_tokens) is None


async def test_concurrency_limit_is_respected():
    with FakeChatServer(latency_s=0.05) as server:
        judge = OpenAIJudge(config(server, concurrency=3))
        verdicts = await asyncio.gather(*(judge.judge(make_image(index), CHECKLIST) for index in range(12)))
        await judge.aclose()
    assert all(verdict.parse_status == "ok" for verdict in verdicts)
    assert server.total_calls == 12
    assert 1 <= server.peak_in_flight <= 3


async def test_token_and_request_limiters_are_charged(server):
    class Recorder:
        def __init__(self) -> None:
            self.amounts: list[float] = []

        async def acquire(self, amount: float = 1) -> None:
            self.amounts.append(amount)

    judge = OpenAIJudge(config(server, requests_per_minute=600, tokens_per_minute=1_000_000))
    state = judge._loop_state()
    state.requests, state.tokens = Recorder(), Recorder()
    image = make_image(3)
    server.script("server_error", image_key=image_key(image))
    await judge.judge(image, CHECKLIST)
    await judge.aclose()
    # Two HTTP requests (one retry): each charged one request and its estimated tokens (prompt + image + output).
    assert state.requests.amounts == [1, 1]
    assert len(state.tokens.amounts) == 2
    assert all(amount > 255 + 256 for amount in state.tokens.amounts)


async def test_tokens_cost_and_prompt_version(server):
    judge = OpenAIJudge(config(server))
    image = make_image(5)
    verdict = await judge.judge(image, CHECKLIST)
    await judge.aclose()
    prompt = render_prompt(CHECKLIST, "paper")
    answer = json.dumps(default_items(image_key(image), 5))
    assert verdict.input_tokens == len(prompt) // 4 + 255
    assert verdict.output_tokens == len(answer) // 4
    assert verdict.cost_usd == pytest.approx(verdict.input_tokens * 2e-6 + verdict.output_tokens * 8e-6)
    assert verdict.latency_s > 0
    assert judge.prompt_version == prompt_version("paper") != prompt_version("structured")
    assert judge.id == f"openai:fake-model@{server.base_url.split('/')[2]}"


async def test_requires_gates_children():
    with FakeChatServer(answer=lambda request: "[0, 1, 1]") as server:
        judge = OpenAIJudge(config(server))
        verdict = await judge.judge(make_image(2), GATED)
        await judge.aclose()
    assert verdict.items == [0, 0, 1]  # colour requires a lesion
    assert verdict.raw == "[0, 1, 1]"  # the raw answer is kept as received


async def test_structured_style_sends_a_schema_and_keeps_reasons(server):
    judge = OpenAIJudge(config(server, prompt_style="structured"))
    image = make_image(4)
    verdict = await judge.judge(image, CHECKLIST)
    await judge.aclose()
    assert verdict.parse_status == "ok"
    assert verdict.items == default_items(image_key(image), 5)
    assert verdict.rationales == ["seen"] * 5
    assert server.requests[0].has_response_format


async def test_rejected_response_format_falls_back_to_json_in_text(server):
    server.script("reject_response_format")
    judge = OpenAIJudge(config(server, prompt_style="structured"))
    first = await judge.judge(make_image(6), CHECKLIST)
    second = await judge.judge(make_image(7), CHECKLIST)
    await judge.aclose()
    assert first.parse_status == second.parse_status == "ok"
    assert [record.has_response_format for record in server.requests] == [True, False, False]


async def test_prompt_carries_a_downscaled_png_without_metadata():
    seen: list[ChatRequest] = []

    def answer(request: ChatRequest) -> str:
        seen.append(request)
        return "[1, 1, 1, 1, 1]"

    source = Image.new("RGB", (200, 100), (200, 120, 90))
    info = PngImagePlugin.PngInfo()
    info.add_text("patient", "Jane Doe, MRN 12345")
    buffer = io.BytesIO()
    source.save(buffer, format="PNG", pnginfo=info)
    tagged = Image.open(io.BytesIO(buffer.getvalue()))
    assert tagged.info.get("patient")  # the source really carries the text chunk
    with FakeChatServer(answer=answer) as server:
        judge = OpenAIJudge(config(server))
        verdict = await judge.judge(tagged, CHECKLIST)
        await judge.aclose()
    assert verdict.parse_status == "ok"
    (request,) = seen
    assert request.image.format == "PNG"
    assert request.image.size == (64, 32)
    assert "patient" not in request.image.info and "exif" not in request.image.info
    assert request.n_items == 5 and "Psoriasis" in request.prompt


async def test_api_key_is_sent_but_never_leaks(server, monkeypatch, caplog):
    secret = "sk-test-" + "9" * 24
    monkeypatch.setenv(KEY_ENV, secret)
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(config(server), sleep=SleepRecorder())
    image = make_image(8)
    server.script("server_error", image_key=image_key(image))
    verdict = await judge.judge(image, CHECKLIST)
    assert verdict.parse_status == "ok"
    assert server.requests[0].authorization == f"Bearer {secret}"
    server.script("unauthorized")
    with pytest.raises(JudgeEndpointError) as raised:
        await judge.judge(make_image(9), CHECKLIST)
    calls = server.total_calls
    with pytest.raises(JudgeEndpointError) as again:  # the judge remembers: no request for a call bound to fail
        await judge.judge(make_image(10), CHECKLIST)
    await judge.aclose()
    assert server.total_calls == calls and again.value is raised.value
    assert "401" in str(raised.value) and KEY_ENV in str(raised.value)
    for text in (str(raised.value), repr(judge), caplog.text, json.dumps(verdict.__dict__, default=str)):
        assert secret not in text


def test_remote_endpoints_need_allow_remote(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(PrivacyError, match="allow_remote"):
        OpenAIJudge(JudgeConfig(api_key_env=KEY_ENV))  # the default OpenAI API
    with pytest.raises(PrivacyError, match="allow_remote"):
        OpenAIJudge(JudgeConfig(base_url="http://10.0.0.5:8000/v1", api_key_env=KEY_ENV))
    # without its key a remote judge can be built (a dry run needs only its id) but not called
    keyless = OpenAIJudge(JudgeConfig(allow_remote=True, api_key_env=KEY_ENV))
    assert keyless.id == "openai:gpt-4o@api.openai.com"
    with pytest.raises(JudgeEndpointError, match=KEY_ENV):
        keyless.check_ready()
    with pytest.raises(JudgeEndpointError, match=KEY_ENV):
        asyncio.run(keyless.judge(make_image(0), CHECKLIST))  # raised before any request: no network here
    monkeypatch.setenv(KEY_ENV, "sk-remote")
    judge = OpenAIJudge(JudgeConfig(allow_remote=True, api_key_env=KEY_ENV))
    judge.check_ready()
    assert judge.id == "openai:gpt-4o@api.openai.com"
    # Loopback needs neither permission nor a key.
    monkeypatch.delenv(KEY_ENV)
    assert OpenAIJudge(JudgeConfig(base_url="http://localhost:11434/v1", api_key_env=KEY_ENV)).id.endswith("@localhost:11434")


def test_judge_is_reusable_across_event_loops(server):
    judge = OpenAIJudge(config(server))
    first = asyncio.run(judge.judge(make_image(10), CHECKLIST))
    second = asyncio.run(judge.judge(make_image(11), CHECKLIST))
    assert first.parse_status == second.parse_status == "ok"


def record_bodies(server: FakeChatServer) -> list[dict]:
    """Make the server answer every image with all items met and keep the body of each answered request."""
    seen: list[dict] = []

    def answer(request: ChatRequest) -> str:
        seen.append(request.body)
        return "[1, 1, 1, 1, 1]"

    server.answer = answer
    return seen


async def test_max_tokens_is_renamed_when_the_server_asks(server):
    seen = record_bodies(server)
    server.script("reject_max_tokens")
    judge = OpenAIJudge(config(server, max_output_tokens=40))
    verdict = await judge.judge(make_image(12), CHECKLIST)
    await judge.judge(make_image(13), CHECKLIST)
    await judge.aclose()
    assert verdict.parse_status == "ok"
    assert server.total_calls == 3  # one rejection, then the judge remembers
    assert [body.get("max_completion_tokens") for body in seen] == [40, 40]
    assert not any("max_tokens" in body for body in seen)


async def test_temperature_is_dropped_when_the_server_rejects_it(server):
    seen = record_bodies(server)
    server.script("reject_temperature")
    judge = OpenAIJudge(config(server))
    first = await judge.judge(make_image(14), CHECKLIST)
    second = await judge.judge(make_image(15), CHECKLIST)
    await judge.aclose()
    assert first.parse_status == second.parse_status == "ok"
    assert server.total_calls == 3  # one rejection, then the judge remembers
    assert first.requests == 2 and second.requests == 1
    assert not any("temperature" in body for body in seen)


async def test_temperature_zero_is_sent_to_servers_that_accept_it(server):
    seen = record_bodies(server)
    judge = OpenAIJudge(config(server))
    await judge.judge(make_image(16), CHECKLIST)
    await judge.aclose()
    assert [body["temperature"] for body in seen] == [0]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("unauthorized", "rejected the API key (HTTP 401"),
        ("forbidden", "denied access (HTTP 403"),
        ("model_not_found", "judge model 'fake-model' not found at"),
        ("quota", "quota exhausted (HTTP 429"),
    ],
)
async def test_systematic_failures_stop_at_the_first_call(server, fault, expected):
    server.script(fault)
    sleep = SleepRecorder()
    judge = OpenAIJudge(config(server), sleep=sleep)
    with pytest.raises(JudgeEndpointError) as raised:
        await judge.judge(make_image(20), CHECKLIST)
    assert expected in str(raised.value) and raised.value.systematic
    assert raised.value.requests == 1 and server.total_calls == 1 and sleep.delays == []  # no retry
    with pytest.raises(JudgeEndpointError):
        await judge.judge(make_image(21), CHECKLIST)
    await judge.aclose()
    assert server.total_calls == 1
    if fault == "model_not_found":
        assert str(raised.value).endswith("check judge.model")


def test_systematic_failure_reads_status_and_body():
    def body(message, code=None):
        return json.dumps({"error": {"message": message, "code": code}})

    quota = body("You exceeded your current quota, please check your plan and billing details.", "insufficient_quota")
    assert systematic_failure(429, quota) == "quota"
    assert systematic_failure(429, quota, retry_after="20") is None  # a rate limit: the server says when
    assert systematic_failure(429, body("Rate limit reached for gpt-4o on tokens per min (TPM)")) is None
    assert systematic_failure(401, body("Incorrect API key")) == "key"
    assert systematic_failure(403, "forbidden") == "access"
    assert systematic_failure(404, body("The model `gpt-4o-2024-05-13` does not exist", "model_not_found")) == "model"
    assert systematic_failure(404, '{"error": "model \\"llava\\" not found, try pulling it first"}') == "model"
    assert systematic_failure(400, body("The model `x` does not exist.")) == "model"
    assert systematic_failure(404, body("no route /v2/chat/completions")) == "url"
    assert systematic_failure(400, body("Invalid image: could not process the image.")) is None
    assert systematic_failure(500, body("The model crashed")) is None
    assert systematic_failure(402, "payment required") == "quota"


async def test_a_failed_repair_call_keeps_the_paid_answer(server):
    image = make_image(22)
    server.script("unparseable", *["server_error"] * 4, image_key=image_key(image))
    judge = OpenAIJudge(config(server), sleep=SleepRecorder())
    verdict = await judge.judge(image, CHECKLIST)
    await judge.aclose()
    assert verdict.parse_status == "failed" and verdict.raw  # the first answer was paid for: stored as failed
    assert "repair" in verdict.error
    assert verdict.requests == 5 == server.calls[image_key(image)]


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.5.0.1/v1", True),
        ("http://[::1]:8080/v1", True),
        ("http://localhost:11434/v1", True),
        ("https://api.openai.com/v1", False),
        ("http://localhost.example.com/v1", False),
        ("http://192.168.1.10:8000/v1", False),
    ],
)
def test_is_loopback_url(url, loopback):
    assert is_loopback_url(url) is loopback


def test_only_synthetic_images_go_to_http_judges_by_default():
    http = JudgeConfig(backend="openai")
    check_may_send(True, http)
    with pytest.raises(PrivacyError, match="send_real_images"):
        check_may_send(False, http)
    check_may_send(False, JudgeConfig(backend="openai", send_real_images=True))
    assert may_send(False, JudgeConfig(backend="hf"))  # in-process judges send nothing
    assert may_send(False, JudgeConfig(backend="rules"))
    assert not may_send(False, JudgeConfig(backend="ensemble", members=["rules", "openai:gpt-4o"]))
    assert may_send(False, JudgeConfig(backend="ensemble", members=["rules", "hf"]))


async def test_server_can_answer_like_the_rules_judge():
    """The answer hook lets a test stand a deterministic judge behind HTTP: here the demo domain's rules judge.
    Grading through the `openai` backend must then give exactly the rules judge's items."""
    import numpy as np

    from magic_align.checklists.schema import load_checklists
    from magic_align.demo.procedural import CONDITIONS, render, to_pil
    from magic_align.judges.rules import make_rules_judge

    checklists = load_checklists("demo")
    rules = make_rules_judge(None, checklists)

    rng = np.random.default_rng(0)
    cases = [(to_pil(render(label, rng).image), checklists[label]) for label in CONDITIONS]
    cases += [(cases[0][0], checklists[CONDITIONS[1]])]  # an image graded against another condition's list
    with FakeChatServer(answer=answer_like(rules, checklists)) as server:
        judge = OpenAIJudge(config(server, image_size=64))
        verdicts = await asyncio.gather(*(judge.judge(image, checklist) for image, checklist in cases))
        await judge.aclose()
    expected = [rules.grade(image, checklist).items for image, checklist in cases]
    assert [verdict.items for verdict in verdicts] == expected
    assert len({tuple(items) for items in expected}) > 1  # the images really differ in what they meet


@pytest.mark.parametrize("usage", ['"12 tokens"', '{"prompt_tokens": "abc", "completion_tokens": [3]}', "[1, 2]"])
def test_an_odd_usage_field_never_loses_the_paid_answer(usage):
    import httpx

    body = '{"choices": [{"message": {"content": "[1, 0, 1, 0, 0]"}}], "usage": ' + usage + "}"
    reply = OpenAIJudge._read_reply(httpx.Response(200, text=body))
    assert reply is not None and reply.content == "[1, 0, 1, 0, 0]"
    assert (reply.input_tokens, reply.output_tokens) == (0, 0)
