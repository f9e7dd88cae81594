"""Writes tests/data/token_corpus.jsonl: texts and requests whose token counts
tests/token_counts.rs compares between tollgate and Python tiktoken (the reference).

Run: python3 tests/data/make_token_corpus.py  (deterministic; no tiktoken needed to write it)
"""
import json
import pathlib
import random

random.seed(7)
texts = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Ünïcödé façade naïve café résumé",
    "日本語のテキストを数えます。東京は日本の首都です。",
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "한국어 문장도 토큰으로 나뉩니다.",
    "Русский текст с пунктуацией, цифрами 123 и т.д.",
    "العربية نص قصير للاختبار",
    "emoji 🎉🚀🔥👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "mixed: English, 日本語, emoji 😀, code `x = 1`, math ∑∫√π≈3.14159",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "const add = (a, b) => a + b;\nexport default { add };\n",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days' ORDER BY name;",
    "<html><body><h1 class=\"title\">Hi</h1></body></html>",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "1234567890 3.14159 -42 1e10 0xdeadbeef 2026-11-25T07:00:00Z",
    "https://example.com/path?query=string&x=1#fragment",
    "a" * 1000,
    "ab" * 700,
    " " * 300,
    "\n" * 100,
    "!!!???..." * 50,
    "The year is 2026 and the gateway counts tokens. " * 40,
    "<|endoftext|> is special but counted as ordinary text here",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "camelCaseIdentifiers and snake_case_identifiers and SCREAMING_CASE",
]
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
for n in [50, 200, 800]:
    texts.append(" ".join(random.choice(words) for _ in range(n)))
texts.append("".join(chr(random.randint(0x4E00, 0x4FFF)) for _ in range(300)))
texts.append("".join(random.choice("😀🎉🚀🔥✨💡") for _ in range(200)))

chats = [
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
    ]},
    {"messages": [{"role": "user", "name": "ana", "content": "Count my name too."}]},
    {"messages": [{"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."}]},
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture:"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "in one sentence."},
    ]}]},
    {"messages": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
    ]},
    {"messages": [{"role": "user", "content": "Book a table."}],
     "tools": [{"type": "function", "function": {
         "name": "book_table", "description": "Books a restaurant table.",
         "parameters": {"type": "object", "properties": {
             "people": {"type": "integer", "description": "How many guests."},
             "time": {"type": "string", "description": "When, ISO 8601."},
             "area": {"type": "string", "enum": ["inside", "terrace"], "description": "Where to sit."},
         }}}}]},
    {"messages": [{"role": "user", "content": "```python\nprint('hello')\n```\nWhy does this fail?"}]},
    {"messages": [{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "List three colours."}]},
]
for text in texts[10:20]:
    chats.append({"messages": [{"role": "user", "content": text}]})

completions = ["Once upon a time", ["first prompt", "second prompt 🎉"], [1, 2, 3, 4, 5]]
embeddings = ["hello world", ["tollgate", "meters tokens", "日本語"], [[100, 200], [300]]]
outputs = [
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France."}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}]}, "finish_reason": "tool_calls"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "one"}}, {"index": 1, "message": {"role": "assistant", "content": "two 🎉"}}]},
    {"choices": [{"index": 0, "text": " there was a gateway."}]},
]

path = pathlib.Path(__file__).with_name("token_corpus.jsonl")
with path.open("w", encoding="utf-8") as out:
    for text in texts:
        out.write(json.dumps({"kind": "text", "input": text}, ensure_ascii=False) + "\n")
    for chat in chats:
        out.write(json.dumps({"kind": "chat", "input": chat}, ensure_ascii=False) + "\n")
    for prompt in completions:
        out.write(json.dumps({"kind": "completion", "input": prompt}, ensure_ascii=False) + "\n")
    for item in embeddings:
        out.write(json.dumps({"kind": "embedding", "input": item}, ensure_ascii=False) + "\n")
    for body in outputs:
        out.write(json.dumps({"kind": "output", "input": body}, ensure_ascii=False) + "\n")
print(path)
