"""Reference token counts from Python tiktoken for tests/data/token_corpus.jsonl.

Prints one JSON object per corpus line: {"o200k_base": N, "cl100k_base": M}. Chat prompts use
the OpenAI cookbook's num_tokens_from_messages (3 per message, 1 per name, 3 reply priming)
and its function-calling estimate for tool definitions; tollgate's documented extensions
(content parts, 85 tokens per image part, tool-call name + arguments) are mirrored here.
"""
import json
import sys

import tiktoken

ENCODINGS = {name: tiktoken.get_encoding(name) for name in ["o200k_base", "cl100k_base"]}


def text_tokens(enc, text):
    return len(enc.encode_ordinary(text)) if text else 0


def message_tokens(enc, message):
    total = 3
    for key, value in message.items():
        if isinstance(value, str):
            total += text_tokens(enc, value)
        elif key == "content" and isinstance(value, list):
            for part in value:
                if part.get("type") in ("text", "input_text"):
                    total += text_tokens(enc, part.get("text", ""))
                elif part.get("type") in ("image_url", "input_image"):
                    total += 85
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                fn = call.get("function", {})
                total += text_tokens(enc, fn.get("name", "")) + text_tokens(enc, fn.get("arguments", ""))
        if key == "name":
            total += 1
    return total


def tools_tokens(enc, name, body):
    functions = [t["function"] for t in body.get("tools", [])] or body.get("functions", [])
    if not functions:
        return 0
    func_init = 7 if name == "o200k_base" else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    total = 0
    for f in functions:
        total += func_init
        desc = f.get("description", "")
        if desc.endswith("."):
            desc = desc[:-1]
        total += text_tokens(enc, f.get("name", "") + ":" + desc)
        props = f.get("parameters", {}).get("properties", {})
        if props:
            total += prop_init
            for key, prop in props.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + text_tokens(enc, item if isinstance(item, str) else json.dumps(item))
                pdesc = prop.get("description", "")
                if pdesc.endswith("."):
                    pdesc = pdesc[:-1]
                total += text_tokens(enc, f"{key}:{prop.get('type', '')}:{pdesc}")
    return max(total + func_end, 0)


def inputs_tokens(enc, value):
    if isinstance(value, str):
        return text_tokens(enc, value)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    if isinstance(value, list):
        return sum(inputs_tokens(enc, v) for v in value)
    return 0


def output_tokens(enc, body):
    total = 0
    for choice in body.get("choices", []):
        message = choice.get("message", {})
        for field in ("content", "refusal"):
            if isinstance(message.get(field), str):
                total += text_tokens(enc, message[field])
        for call in message.get("tool_calls") or []:
            total += text_tokens(enc, call.get("function", {}).get("arguments", ""))
        if isinstance(choice.get("text"), str):
            total += text_tokens(enc, choice["text"])
    return total


def count(name, enc, entry):
    kind, value = entry["kind"], entry["input"]
    if kind == "text":
        return text_tokens(enc, value)
    if kind == "chat":
        return sum(message_tokens(enc, m) for m in value["messages"]) + 3 + tools_tokens(enc, name, value)
    if kind in ("completion", "embedding"):
        return inputs_tokens(enc, value)
    return output_tokens(enc, value)


for line in open(sys.argv[1], encoding="utf-8"):
    entry = json.loads(line)
    print(json.dumps({name: count(name, enc, entry) for name, enc in ENCODINGS.items()}))
