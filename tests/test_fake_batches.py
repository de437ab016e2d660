"""The fake server's batch queue limit (OpenAI's "enqueued tokens"), through the official ``openai`` client:
admission at create, ``token_limit_exceeded`` failures, the queue freeing as batches finish, and its record."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from PIL import Image

from lenscap.caption.pricing import image_tokens, text_tokens
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

PROMPT = "Caption this."
SIZE = (64, 48)


def jpeg_url(seed: int = 0) -> str:
    buf = io.BytesIO()
    Image.new("RGB", SIZE, (40 * seed % 256, 120, 200)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def line(i: int, detail: str | None = "low", model: str = "gpt-4.1") -> dict:
    image = {"url": jpeg_url(i)} | ({"detail": detail} if detail else {})
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": image}]}
            ],
            "max_tokens": 50,
        },
    }


def line_tokens(detail: str = "low", model: str = "gpt-4.1") -> int:
    return text_tokens(PROMPT) + image_tokens(model, *SIZE, detail)


def submit(client: openai.OpenAI, lines: list[dict | str]) -> str:
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def queue(fake: FakeOpenAI) -> list[int]:
    with fake._lock:  # appended on the server's thread
        return [n for _, n in fake.enqueued_log]


@pytest.fixture
def fake():
    with FakeOpenAI(batch_delay_s=3600) as server:  # batches wait until released
        yield server


@pytest.fixture
def client(fake):
    return openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)


def test_batches_under_the_limit_are_admitted_counted_and_complete(fake, client):
    per = line_tokens()
    fake.configure(batch_queue_limit=7 * per)  # exactly the two batches: the limit is inclusive
    a = submit(client, [line(i) for i in range(3)])
    b = submit(client, [line(i) for i in range(3, 7)])
    assert fake.enqueued_tokens() == 7 * per and fake.peak_enqueued == 7 * per
    assert [client.batches.retrieve(x).status for x in (a, b)] == ["in_progress", "in_progress"]
    assert fake.enqueued_tokens() == 7 * per, "in progress still counts"
    fake.release_batches()
    done = [client.batches.retrieve(x) for x in (a, b)]
    assert [d.status for d in done] == ["completed", "completed"] and done[1].request_counts.completed == 4
    assert fake.enqueued_tokens() == 0 and fake.peak_enqueued == 7 * per
    assert queue(fake) == [3 * per, 7 * per, 4 * per, 0]


def test_a_batch_past_the_limit_is_accepted_then_fails_and_is_not_counted(fake, client):
    per = line_tokens()
    limit = 15 * per  # over a thousand: the message writes it with separators
    assert limit >= 1000
    fake.configure(batch_queue_limit=limit)
    a = submit(client, [line(i) for i in range(10)])
    f = client.files.create(file=("in.jsonl", "\n".join(json.dumps(line(i)) for i in range(6)).encode()), purpose="batch")
    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert created.status == "validating", "create succeeds: the failure comes later"
    assert fake.enqueued_tokens() == 10 * per
    failed = client.batches.retrieve(created.id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert (failed.request_counts.total, failed.request_counts.completed, failed.request_counts.failed) == (0, 0, 0)
    assert failed.errors is not None and failed.errors.model_dump() == {
        "object": "list",
        "data": [
            {
                "code": "token_limit_exceeded",
                "param": None,
                "line": None,
                "message": f"Enqueued token limit reached for gpt-4.1 in organization org-fake. Limit: {limit:,} enqueued tokens. "
                "Please try again once some in_progress batches have been completed.",
            }
        ],
    }
    assert f"Limit: {limit:,} enqueued tokens" in failed.errors.data[0].message and "," in f"{limit:,}"
    assert fake.enqueued_tokens() == 10 * per and queue(fake) == [10 * per], "a rejected batch never enters the queue"
    assert client.batches.retrieve(a).status == "in_progress"
    raw = client.batches.with_raw_response.retrieve(a).http_response.json()
    assert not [k for k in raw if k.startswith("_")], "private keys stay private"


def test_the_queue_frees_when_a_batch_ends(fake, client):
    per = line_tokens()
    fake.configure(batch_queue_limit=10 * per)
    a = submit(client, [line(i) for i in range(8)])
    b = submit(client, [line(i) for i in range(8, 12)])
    assert client.batches.retrieve(b).status == "failed"
    fake.release_batches()
    assert client.batches.retrieve(a).status == "completed" and fake.enqueued_tokens() == 0
    c = submit(client, [line(i) for i in range(8, 12)])
    assert client.batches.retrieve(c).status == "in_progress" and fake.enqueued_tokens() == 4 * per
    client.batches.cancel(c)
    assert fake.enqueued_tokens() == 4 * per, "cancelling still counts"
    assert client.batches.retrieve(c).status == "cancelled" and fake.enqueued_tokens() == 0
    assert queue(fake) == [8 * per, 0, 4 * per, 0] and fake.peak_enqueued == 8 * per
    times = [t for t, _ in fake.enqueued_log]
    assert times == sorted(times)


def test_tokens_follow_detail_and_invalid_lines_count_nothing(fake, client):
    bad = line(3)
    bad["body"]["messages"][0]["content"][1]["image_url"]["url"] = "data:image/jpeg;base64,bm90IGFuIGltYWdl"
    submit(
        client,
        [
            line(0),
            line(1, detail="high"),
            line(2, detail=None),
            bad,
            "{not json",
            {"custom_id": "x", "body": {"model": "gpt-4.1"}},
        ],
    )
    assert fake.enqueued_tokens() == 2 * line_tokens("low") + line_tokens("high")
    assert line_tokens("high") != line_tokens("low")


def test_the_error_names_the_first_requests_model(fake, client):
    fake.configure(batch_queue_limit=10)
    b = submit(client, [line(0, model="gpt-4o-mini")])
    message = client.batches.retrieve(b).errors.data[0].message
    assert message.startswith("Enqueued token limit reached for gpt-4o-mini in organization org-fake. Limit: 10 enqueued")


def test_no_limit_by_default_admits_everything(client, fake):
    assert FakeSettings().batch_queue_limit is None
    ids = [submit(client, [line(i) for i in range(k, k + 20)]) for k in range(0, 100, 20)]
    assert fake.enqueued_tokens() == 100 * line_tokens()
    fake.release_batches()
    done = [client.batches.retrieve(x) for x in ids]
    assert all(d.status == "completed" and d.errors is None and d.request_counts.completed == 20 for d in done)
    assert fake.enqueued_tokens() == 0 and fake.peak_enqueued == 100 * line_tokens()
    out = client.files.content(done[0].output_file_id).text.splitlines()
    assert json.loads(out[0])["response"]["body"]["usage"]["prompt_tokens"] == line_tokens()


def test_a_request_the_api_would_refuse_is_a_400_with_its_error_type(fake, client):
    """The chat endpoint answers an invalid request as OpenAI does: 400, ``invalid_request_error``."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": [{"type": "video"}]}])
    assert refused.value.status_code == 400
    assert refused.value.body["type"] == "invalid_request_error"
