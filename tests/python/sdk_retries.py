"""The OpenAI SDK's retry behaviour against tollgate's two kinds of 429.

Usage: sdk_retries.py BASE_URL BROKE_KEY THROTTLED_KEY (the second has rpm = 60).
"""
import json
import sys
import time

import openai
from openai import OpenAI

base_url, broke_key, throttled_key = sys.argv[1:4]
messages = [{"role": "user", "content": "hi"}]
seen = {}

broke = OpenAI(base_url=base_url, api_key=broke_key, max_retries=3)
try:
    broke.chat.completions.create(model="gpt-4o-mini", messages=messages)
except openai.RateLimitError as error:
    seen["quota_error"] = type(error).__name__
    seen["quota_code"] = error.code

throttled = OpenAI(base_url=base_url, api_key=throttled_key, max_retries=3)
for _ in range(60):
    throttled.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=4)
started = time.monotonic()
reply = throttled.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=4)
seen["throttled_wait_s"] = time.monotonic() - started
seen["throttled_then_ok"] = reply.object == "chat.completion"
print(json.dumps(seen))
