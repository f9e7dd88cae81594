"""Drives tollgate with the official OpenAI Python SDK, exactly as an application would.

Usage: sdk_client.py BASE_URL KEY. Prints one JSON object of what the SDK saw; the Rust test
asserts on it. Any SDK-side failure raises and fails the test.
"""
import json
import sys

from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
seen = {}

chat = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Say hello in five words."}],
    extra_body={"mock": {"reply_tokens": 5}},
)
seen["chat"] = {
    "object": chat.object,
    "content": chat.choices[0].message.content,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump() if chat.usage else None,
}

raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
)
seen["headers"] = {
    name: raw.headers.get(name)
    for name in ["x-request-id", "x-tollgate-model", "x-tollgate-route"]
}

pieces, usage, finish = [], None, None
with client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Stream seven words."}],
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"mock": {"reply_tokens": 7}},
) as stream:
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
seen["stream"] = {"content": "".join(pieces), "usage": usage, "finish_reason": finish}

chunks_without_usage = 0
for chunk in client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Stream without usage."}],
    stream=True,
):
    assert chunk.usage is None, "a usage chunk leaked to a client that did not ask"
    chunks_without_usage += 1
seen["plain_stream_chunks"] = chunks_without_usage

embedding = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
seen["embeddings"] = {
    "count": len(embedding.data),
    "dims": len(embedding.data[0].embedding),
    "usage": embedding.usage.model_dump(),
}

models = client.models.list()
seen["models"] = sorted(m.id for m in models.data)
seen["retrieved_model"] = client.models.retrieve("gpt-4o-mini").id

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except Exception as error:  # noqa: BLE001 - the SDK's own class is what we report
    seen["unknown_model_error"] = type(error).__name__

bad = OpenAI(base_url=base_url, api_key="sk-not-a-key", max_retries=0)
try:
    bad.models.list()
    bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
except Exception as error:  # noqa: BLE001
    seen["bad_key_error"] = type(error).__name__

print(json.dumps(seen))
