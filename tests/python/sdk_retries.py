"""The OpenAI SDK's retry behaviour against tollgate's two kinds of 429.

Usage: sdk_retries.py BASE_URL BROKE_KEY THROTTLED_KEY (the second has max_concurrency = 1).
"""
import json
import sys
import threading
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

throttled = OpenAI(base_url=base_url, api_key=throttled_key, max_retries=5)
# Hold the key's only concurrency slot with a 1.5 s stream, then ask again at once: the
# gateway answers 429 rate_limit_exceeded with Retry-After, and the SDK waits and retries.
holder = throttled.chat.completions.create(
    model="gpt-4o-mini", messages=messages, stream=True, extra_body={"mock": {"reply_tokens": 15}}
)
first = next(iter(holder))
drain = threading.Thread(target=lambda: [None for _ in holder])
drain.start()
started = time.monotonic()
reply = throttled.chat.completions.create(
    model="gpt-4o-mini", messages=messages, extra_body={"mock": {"reply_tokens": 1}}
)
seen["throttled_wait_s"] = time.monotonic() - started
seen["throttled_then_ok"] = reply.object == "chat.completion"
drain.join()
print(json.dumps(seen))
