"""Drives tollgate's Responses API with the official OpenAI Python SDK, unmodified.

Usage: sdk_responses.py BASE_URL KEY POOR_KEY. Prints one JSON object of what the SDK saw;
the Rust test asserts on it. Any SDK-side failure raises and fails the test.
"""
import json
import sys

import openai
from openai import OpenAI

base_url, key, poor_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
seen = {}

plain = client.responses.with_raw_response.create(
    model="gpt-4o-mini",
    instructions="Be brief.",
    input="Say hi",
    extra_body={"mock": {"reply_tokens": 5}},
)
response = plain.parse()
seen["plain"] = {
    "object": response.object,
    "status": response.status,
    "text": response.output_text,
    "usage": response.usage.model_dump(),
    "headers": {name: plain.headers.get(name) for name in ["x-tollgate-model", "x-tollgate-route"]},
}

deltas, completed = [], None
with client.responses.stream(
    model="gpt-4o-mini",
    input=[{"role": "user", "content": [{"type": "input_text", "text": "Stream seven words."}]}],
    extra_body={"mock": {"reply_tokens": 7}},
) as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    completed = stream.get_final_response()
seen["stream"] = {
    "text": "".join(deltas),
    "final_text": completed.output_text,
    "usage": completed.usage.model_dump(),
}

tools = [{
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}]
called = client.responses.create(
    model="gpt-4o-mini",
    input="What is the weather in Oslo?",
    tools=tools,
    extra_body={"mock": {"tool_call": True, "reply": "{\"city\": \"Oslo\"}"}},
)
call = next(item for item in called.output if item.type == "function_call")
seen["tool"] = {"name": call.name, "arguments": json.loads(call.arguments), "usage": called.usage.model_dump()}

follow = client.responses.with_raw_response.create(
    model="auto",
    previous_response_id=called.id,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12C, clear"}],
    extra_body={"mock": {"reply_tokens": 4}},
)
followed = follow.parse()
seen["continued"] = {
    "previous_response_id": followed.previous_response_id,
    "text": followed.output_text,
    "headers": {name: follow.headers.get(name) for name in ["x-tollgate-model", "x-tollgate-route"]},
}
seen["retrieved"] = client.responses.retrieve(called.id).id
seen["input_items"] = [item.type for item in client.responses.input_items.list(followed.id).data]
client.responses.delete(followed.id)
try:
    client.responses.retrieve(followed.id)
except openai.NotFoundError as error:
    seen["after_delete"] = error.status_code

poor = OpenAI(base_url=base_url, api_key=poor_key, max_retries=0)
try:
    poor.responses.create(model="gpt-4o", input="Write a novel", max_output_tokens=1000)
except openai.RateLimitError as error:
    seen["refused"] = {"status": error.status_code, "code": error.code}

print(json.dumps(seen))
