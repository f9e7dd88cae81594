"""Drives tollgate's Messages API with the official Anthropic Python SDK, unmodified.

Usage: sdk_anthropic.py BASE_URL KEY POOR_KEY [MODEL]. Prints one JSON object of what the SDK saw;
the Rust test asserts on it. Any SDK-side failure raises and fails the test.
"""
import json
import sys

import anthropic

base_url, key, poor_key = sys.argv[1], sys.argv[2], sys.argv[3]
model = sys.argv[4] if len(sys.argv) > 4 else "gpt-4o-mini"
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
seen = {}

raw = client.messages.with_raw_response.create(
    model=model,
    max_tokens=64,
    system="Be brief.",
    messages=[{"role": "user", "content": "Say hi"}],
    extra_body={"mock": {"reply_tokens": 5}},
)
message = raw.parse()
seen["plain"] = {
    "type": message.type,
    "role": message.role,
    "text": message.content[0].text,
    "stop_reason": message.stop_reason,
    "usage": message.usage.model_dump(),
    "headers": {name: raw.headers.get(name) for name in ["x-tollgate-model", "x-tollgate-route"]},
}

pieces = []
with client.messages.stream(
    model=model,
    max_tokens=64,
    messages=[{"role": "user", "content": [{"type": "text", "text": "Stream seven words."}]}],
    extra_body={"mock": {"reply_tokens": 7}},
) as stream:
    for text in stream.text_stream:
        pieces.append(text)
    final = stream.get_final_message()
seen["stream"] = {
    "text": "".join(pieces),
    "final_text": final.content[0].text,
    "stop_reason": final.stop_reason,
    "usage": final.usage.model_dump(),
}

tools = [{
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
asked = [{"role": "user", "content": "What is the weather in Oslo?"}]
called = client.messages.create(
    model=model,
    max_tokens=64,
    tools=tools,
    messages=asked,
    extra_body={"mock": {"tool_call": True, "reply": "{\"city\": \"Oslo\"}"}},
)
use = next(block for block in called.content if block.type == "tool_use")
seen["tool"] = {"name": use.name, "input": use.input, "stop_reason": called.stop_reason}

streamed_tool = None
with client.messages.stream(
    model=model,
    max_tokens=64,
    tools=tools,
    messages=asked,
    extra_body={"mock": {"tool_call": True, "reply": "{\"city\": \"Oslo\"}"}},
) as stream:
    streamed_tool = stream.get_final_message()
block = next(block for block in streamed_tool.content if block.type == "tool_use")
seen["streamed_tool"] = {"name": block.name, "input": block.input, "stop_reason": streamed_tool.stop_reason}

answered = client.messages.create(
    model="auto",
    max_tokens=64,
    tools=tools,
    messages=asked + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12C, clear"}]},
    ],
    extra_body={"mock": {"reply_tokens": 4}},
)
seen["answered"] = {"text": answered.content[0].text, "stop_reason": answered.stop_reason}

seen["count"] = client.messages.count_tokens(
    model=model,
    system="Be brief.",
    messages=[{"role": "user", "content": "Say hi"}],
).input_tokens

try:
    client.messages.create(
        model="gpt-4o-mini",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "x"}],
    )
except anthropic.BadRequestError as error:
    seen["untranslatable"] = {"status": error.status_code, "type": error.body["error"]["type"],
                              "message": error.body["error"]["message"]}

poor = anthropic.Anthropic(base_url=base_url, api_key=poor_key, max_retries=0)
try:
    poor.messages.create(model="gpt-4o", max_tokens=1000, messages=[{"role": "user", "content": "Write a novel"}])
except anthropic.RateLimitError as error:
    seen["refused"] = {"status": error.status_code, "type": error.body["error"]["type"]}

stranger = anthropic.Anthropic(base_url=base_url, api_key="sk-not-a-key", max_retries=0)
try:
    stranger.messages.create(model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "x"}])
except anthropic.AuthenticationError as error:
    seen["unauthenticated"] = {"status": error.status_code, "type": error.body["error"]["type"]}

print(json.dumps(seen))
