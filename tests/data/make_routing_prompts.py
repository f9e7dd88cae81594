"""Writes tests/data/routing_prompts.jsonl: a labelled prompt set for the complexity router.

Each line: {"id", "category", "label": "cheap" | "frontier", "request": chat body}. Labels are
what a careful engineer would pick for the task, by category and content, not by the router's
rules: short factual, conversational, mechanical text tasks → cheap; multi-step reasoning,
proofs, design, debugging, code generation, long-context analysis and tool use → frontier.
Deterministic (fixed seed). Run: python3 tests/data/make_routing_prompts.py
"""
import json
import pathlib
import random

random.seed(42)
rows = []


def add(category, label, content, system=None, extra=None, history=None):
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    for turn in history or []:
        messages.append(turn)
    messages.append({"role": "user", "content": content})
    request = {"model": "auto", "messages": messages}
    request.update(extra or {})
    rows.append({"id": f"{category}-{len([r for r in rows if r['category'] == category]) + 1}",
                 "category": category, "label": label, "request": request})


chit_chat = ["hi!", "Hello, how are you today?", "Good morning :)", "thanks, that helped a lot",
             "hey there, what's up?", "Can you say hi to my team?", "lol that's funny", "ok cool",
             "Thank you so much!", "Have a great weekend!", "Who are you?", "Are you a robot?",
             "Tell me a short joke.", "What's your name?", "I'm bored, say something nice.",
             "good night", "How's it going?", "Can you cheer me up with one sentence?",
             "yo", "Nice to meet you!", "What's a fun fact about cats?", "Say something in pirate speak.",
             "Do you like music?", "happy friday!", "brb"]
for text in chit_chat:
    add("chit-chat", "cheap", text)

lookups = ["What is the capital of Australia?", "Who wrote Pride and Prejudice?", "When was the Eiffel Tower built?",
           "What is the boiling point of water in Fahrenheit?", "How many continents are there?",
           "What does HTTP stand for?", "Who painted the Mona Lisa?", "What is the largest planet in our solar system?",
           "What's the currency of Japan?", "Where is Mount Kilimanjaro?", "What is the chemical symbol for gold?",
           "How many days are in a leap year?", "What language is spoken in Brazil?", "Who was the first person on the moon?",
           "What is the population of Canada, roughly?", "What year did World War II end?", "What is the speed of light?",
           "Define the word 'ephemeral'.", "What's the tallest building in the world?", "What port does SSH use by default?",
           "What is the freezing point of water in Kelvin?", "Which ocean is the largest?", "What is a synonym for happy?",
           "Who is the author of 1984?", "What is the time zone of New York?"]
for text in lookups:
    add("lookup", "cheap", text)

phrases = ["Good morning, how did you sleep?", "The meeting is moved to Thursday at 3pm.", "Where is the nearest train station?",
           "Thank you for your order, it will ship tomorrow.", "Please turn off your phone during the show.",
           "I would like a coffee with oat milk.", "Our office is closed on public holidays.", "The package was delivered to the front desk.",
           "Can you recommend a good restaurant nearby?", "Your password has been reset successfully."]
languages = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese"]
for i, phrase in enumerate(phrases):
    for lang in random.sample(languages, 2):
        add("translation", "cheap", f"Translate to {lang}: {phrase}")
add("translation", "cheap", "translate 'see you tomorrow' into Korean")
add("translation", "cheap", "How do you say 'thank you' in Dutch?")
add("translation", "cheap", "Translate this to English: 'Je voudrais réserver une table pour deux.'")
add("translation", "cheap", "Translate into Spanish: 'The invoice is attached.'")
add("translation", "cheap", "What's 'library' in German?")

people = ["Maria Gonzalez", "Tom Becker", "Aiko Tanaka", "Priya Nair", "Lars Olsen", "Chen Wei", "Fatima Khan", "John Miller"]
cities = ["Berlin", "Austin", "Osaka", "Lyon", "Toronto", "Pune", "Oslo", "Lisbon"]
for i in range(22):
    person, city = people[i % len(people)], cities[(i * 3) % len(cities)]
    kind = i % 4
    if kind == 0:
        add("extraction", "cheap", f"Extract the name, city and phone number as JSON: 'Hi, I'm {person} from {city}, call me at +1 555 01{i:02d}.'")
    elif kind == 1:
        add("extraction", "cheap", f"Pull out all the dates from this text: 'The contract with {person} starts on 3 March 2025 and ends 2 March 2026; review on 1 September 2025.'")
    elif kind == 2:
        add("extraction", "cheap", f"List the email addresses in: 'Contact {person.split()[0].lower()}@example.com or sales@acme.io, cc ops@acme.io.'")
    else:
        add("extraction", "cheap", f"Classify the sentiment of this review as positive, negative or neutral: 'The hotel in {city} was clean but the staff were rude.'")

topics = ["the quarterly sales meeting", "a product launch email", "a news article about a new bridge in the city",
          "a customer complaint about late delivery", "release notes for version 2.3", "a blog post about remote work",
          "a podcast episode about gardening", "a research abstract about sleep and memory", "a town council announcement",
          "a support ticket thread about a login problem"]
for i, topic in enumerate(topics):
    body = " ".join(random.choice([
        "The team reviewed the numbers and agreed on next steps.", "Several customers asked about pricing.",
        "The timeline was extended by two weeks.", "Feedback was mostly positive.", "A few issues remain open.",
        "The budget was approved by finance.", "Everyone agreed to meet again next month.",
    ]) for _ in range(8))
    add("summarisation", "cheap", f"Summarize this in two sentences ({topic}): {body}")
    add("summarisation", "cheap", f"TL;DR of {topic}: {body[:200]}")
for text in ["Give me a one-line summary of the plot of Romeo and Juliet.", "Summarise the water cycle in three bullet points."]:
    add("summarisation", "cheap", text)

rewrites = ["Rewrite this more politely: 'Send me the report now.'", "Fix the grammar: 'me and him goes to the store yesterday'",
            "Make this sentence shorter: 'At this point in time we are currently in the process of reviewing your application.'",
            "Rephrase in a friendly tone: 'Your request has been denied.'", "Turn this into a bullet list: apples, bananas, oranges, milk",
            "Rewrite as a formal email opening: 'hey guys, quick update'", "Correct the spelling: 'recieve, seperate, occured'",
            "Make this headline catchier: 'New Library Hours Announced'", "Convert to passive voice: 'The cat chased the mouse.'",
            "Rewrite this tweet to be under 100 characters: 'We are thrilled to announce that our new app is finally available for download on all platforms today!'",
            "Capitalize this title properly: 'the lord of the rings: the return of the king'", "Paraphrase: 'The early bird catches the worm.'",
            "Rewrite in plain English: 'Pursuant to the aforementioned agreement, payment is due forthwith.'",
            "Make this more concise: 'I just wanted to reach out and follow up on my previous email from last week.'",
            "Change to past tense: 'She walks to work and buys a coffee.'", "Format this as a title: 'how to bake bread at home'",
            "Rewrite this sentence for a 5-year-old: 'Photosynthesis converts light energy into chemical energy.'",
            "Fix the punctuation: 'lets eat grandma'", "Shorten this to one word: 'a feeling of great happiness'",
            "Rewrite 'The product is good' with more enthusiasm.", "Convert these to title case: hello world, good day",
            "Reword this to sound more confident: 'I think maybe we could try the new plan?'"]
for text in rewrites:
    add("rewriting", "cheap", text)

maths = ["A train leaves at 3:40pm going 80 km/h; another leaves the same station at 4:10pm going 110 km/h on the same track. When and where does the second catch the first? Show your work step by step.",
         "Solve the system: 2x + 3y = 12 and 5x - y = 13. Explain each step.",
         "Find all real solutions of x^4 - 5x^2 + 4 = 0 and justify your answer.",
         "A bag has 5 red and 7 blue balls. Three are drawn without replacement. What is the probability that exactly two are red? Derive it.",
         "Compute the derivative of f(x) = x^3 * ln(x) and find its critical points.",
         "Evaluate the integral of x * e^(2x) dx from 0 to 1, step by step.",
         "A loan of $20,000 at 6% annual interest compounded monthly is repaid over 5 years. Calculate the monthly payment and total interest.",
         "How many ways can 8 people sit around a round table if two of them refuse to sit next to each other? Explain the reasoning.",
         "Find the eigenvalues and eigenvectors of the matrix [[2, 1], [1, 2]].",
         "If the sum of three consecutive odd numbers is 147, what are they? Then generalize to n consecutive odd numbers.",
         "A rectangle's length is 3 more than twice its width and its area is 90. Find its dimensions, showing the algebra.",
         "Estimate how many piano tuners there are in Chicago, walking through each assumption (Fermi estimate).",
         "What is 17^23 mod 31? Use modular exponentiation and show the steps.",
         "Two dice are rolled until a sum of 7 appears. What is the expected number of rolls? Derive the answer.",
         "A population grows 4% per year. How many years until it triples? Solve exactly and approximately.",
         "Determine whether the series sum of 1/(n log n) converges, with a rigorous argument.",
         "Minimize 3x^2 + 2y^2 subject to x + y = 10 using Lagrange multipliers.",
         "A tank drains at a rate proportional to the square root of the water height. Set up and solve the differential equation.",
         "Calculate the compound annual growth rate if revenue went from 1.2M to 3.5M in 6 years, then project year 9.",
         "In how many ways can you make change for 1 dollar using pennies, nickels, dimes and quarters? Explain the method.",
         "Find the shortest distance from the point (3, -1, 2) to the plane 2x - y + 2z = 5, step by step.",
         "A store discounts an item 20%, then raises the new price 25%. Compared to the original, what changed? Then solve for the discount that would make a 25% raise return exactly to the original."]
for text in maths:
    add("multi-step-math", "frontier", text)

proofs = ["Prove that the square root of 2 is irrational.", "Prove that there are infinitely many prime numbers.",
          "Prove by induction that 1 + 2 + ... + n = n(n+1)/2.", "Prove that every tree with n vertices has n - 1 edges.",
          "Show that the composition of two injective functions is injective.", "Prove that a group of prime order is cyclic.",
          "Prove the triangle inequality for real numbers.", "Prove that there is no largest even number.",
          "Prove that the halting problem is undecidable.", "Prove that any connected graph with all even degrees has an Eulerian circuit.",
          "Prove that the product of two odd integers is odd, formally.", "Derive the quadratic formula from ax^2 + bx + c = 0.",
          "Prove that log2(3) is irrational.", "Prove that a continuous function on a closed interval attains a maximum.",
          "Prove De Morgan's laws for sets.", "Derive the formula for the sum of a geometric series and prove it converges when |r| < 1.",
          "Prove that between any two rational numbers there is an irrational number.", "Prove that the set of real numbers is uncountable.",
          "Prove that Dijkstra's algorithm returns shortest paths when all edge weights are non-negative.",
          "Show rigorously that the empty set is a subset of every set, then prove the power set of an n-element set has 2^n elements."]
for text in proofs:
    add("proof", "frontier", text)

algos = ["Design an algorithm to find the k most frequent words in a 50 GB log file on a machine with 8 GB of RAM. Discuss trade-offs.",
         "Design a rate limiter for a distributed API gateway handling 1M requests per second. Compare token bucket, sliding window and GCRA.",
         "How would you design a URL shortener that scales to billions of links? Cover storage, hashing, and cache invalidation.",
         "Give an O(n log n) algorithm for counting inversions in an array and explain why it is correct.",
         "Design a data structure supporting insert, delete and getRandom in O(1) average time. Prove the complexity.",
         "Design the architecture of a real-time collaborative text editor. Compare OT and CRDTs and their trade-offs.",
         "Propose an algorithm to detect cycles in a directed graph with 10 million nodes and analyze its complexity.",
         "Design a scheduling system for hospital shifts with fairness constraints; what algorithm would you use and why?",
         "How would you implement consistent hashing with virtual nodes, and what happens when a node fails?",
         "Design an LRU cache that is safe under heavy concurrency. Discuss lock granularity and trade-offs.",
         "Find the longest palindromic substring in O(n) time. Explain Manacher's algorithm and why it works.",
         "Design a system to deduplicate near-identical documents at web scale. Compare MinHash and SimHash.",
         "What is the best strategy to shard a multi-tenant Postgres database with very uneven tenant sizes? Analyze the options.",
         "Design a leaderboard service for a game with 50M daily players, with top-100 and rank-of-player queries.",
         "Design an algorithm for matching riders to drivers in a ride-sharing app that minimizes total wait time.",
         "Explain how you'd build a search autocomplete with typo tolerance under 50 ms p99. Discuss data structures.",
         "Design a job queue with exactly-once processing semantics on top of an at-least-once message broker.",
         "Compare B-trees and LSM-trees for a write-heavy time-series workload and recommend one with justification.",
         "Design a fraud detection pipeline for card payments with sub-second decisions; discuss features, models and feedback loops.",
         "Given n intervals, find the minimum number of meeting rooms required. Prove the greedy approach is optimal.",
         "Design a billing system that meters API usage per token and produces invoices with exact money arithmetic."]
for text in algos:
    add("algorithm-design", "frontier", text)

bugs = [("Why does this Python code print the same number every time?\n```python\nfuncs = [lambda: i for i in range(5)]\nprint([f() for f in funcs])\n```", None),
        ("My Rust code fails to compile with 'borrowed value does not live long enough'. Here it is:\n```rust\nfn longest<'a>(v: &'a Vec<String>) -> &'a str {\n    let s = String::from(\"x\");\n    if v.is_empty() { return &s; }\n    &v[0]\n}\n```\nWhat is wrong and how do I fix it?", None),
        ("This SQL query is extremely slow on 10M rows. How do I speed it up?\n```sql\nSELECT * FROM orders WHERE DATE(created_at) = '2024-01-01' ORDER BY total DESC;\n```", None),
        ("Our Node.js service leaks memory slowly over days. Heap snapshots show growing arrays of closures in an event emitter. How should I debug this?", None),
        ("Intermittent deadlock in our Java service: two threads lock accountA then accountB and vice versa during transfers. Diagnose the root cause and propose a fix.", None),
        ("Why does this Go program sometimes panic with 'concurrent map writes'?\n```go\nvar m = map[string]int{}\nfunc handler(w http.ResponseWriter, r *http.Request) { m[r.URL.Path]++ }\n```", None),
        ("My React component re-renders infinitely:\n```js\nfunction App() {\n  const [data, setData] = useState([]);\n  useEffect(() => { fetch('/api').then(r => r.json()).then(setData); });\n  return <List items={data} />;\n}\n```\nWhy?", None),
        ("Kubernetes pods keep getting OOMKilled even though the app uses 200MB according to our metrics; the limit is 512Mi. What could cause this and how do I investigate?", None),
        ("Why is this C function returning garbage?\n```c\nchar* greet(const char* name) {\n    char buf[64];\n    sprintf(buf, \"Hello %s\", name);\n    return buf;\n}\n```", None),
        ("Our p99 latency doubled after upgrading the HTTP client library, but p50 is unchanged. Walk me through how to find the root cause.", None),
        ("Debug this Python: it raises 'RuntimeError: dictionary changed size during iteration'.\n```python\nfor k in d:\n    if d[k] == 0:\n        del d[k]\n```\nExplain and fix, and discuss performance for large dicts.", None),
        ("A flaky integration test fails 1 in 50 runs with a timeout when run in parallel in CI but never locally. How would you diagnose it systematically?", None),
        ("Why does floating point sum of 0.1 ten times not equal 1.0 in JavaScript, and how should a billing system handle money instead?", None),
        ("Our Postgres database CPU spikes every night at 2am and queries time out. Autovacuum logs show long runs. How do we diagnose and fix this?", None),
        ("This async Rust code deadlocks:\n```rust\nlet guard = mutex.lock().unwrap();\nsome_async_call().await;\ndrop(guard);\n```\nExplain exactly why and what to do instead.", None),
        ("TLS handshakes fail with 'certificate verify failed' only for some users behind a corporate proxy. How do I debug it?", None),
        ("Explain why this binary search loops forever and fix it:\n```python\ndef bs(a, x):\n    lo, hi = 0, len(a)\n    while lo < hi:\n        mid = (lo + hi) // 2\n        if a[mid] < x: lo = mid\n        else: hi = mid\n    return lo\n```", None),
        ("Our Kafka consumers keep rebalancing every few minutes and lag grows. What are the likely causes and how do I confirm each?", None),
        ("Segfault in a C++ program only with -O2, not -O0. How do I track down undefined behaviour like this?", None),
        ("Docker build is suddenly 10x slower after adding one COPY line early in the Dockerfile. Why, and how do I restructure it?", None)]
for text, _ in bugs:
    add("debugging", "frontier", text)

codegen = ["Write a Python function that parses an ISO 8601 duration string like 'P3DT4H5M' into seconds, with tests.",
           "Implement a thread-safe bounded queue in Rust with blocking push and pop, using Condvar.",
           "Write a TypeScript React hook useDebounce with cancellation and unit tests.",
           "Implement a trie in Go with insert, search and prefix listing, plus benchmarks.",
           "Write a SQL schema and queries for a library system: books, members, loans, fines. Include indexes.",
           "Implement the A* pathfinding algorithm in Python for a grid with obstacles and diagonal moves.",
           "Write a Bash script that rotates logs older than 7 days, compresses them, and keeps the last 30 archives.",
           "Implement a simple HTTP/1.1 server in C that serves static files, handling keep-alive.",
           "Write a Python asyncio web crawler that respects robots.txt and limits concurrency per domain.",
           "Implement JWT verification middleware for an Express.js app with RS256 and key rotation.",
           "Write a Rust function that merges k sorted iterators lazily using a binary heap, with tests.",
           "Generate a Terraform module for an AWS VPC with public and private subnets across three AZs.",
           "Write a Python class implementing an LRU cache with TTL expiry and tests using pytest.",
           "Implement a CSV to Parquet converter in Python that streams large files and infers a schema.",
           "Write a Kotlin coroutine-based retry utility with exponential backoff and jitter.",
           "Implement Conway's Game of Life in JavaScript with a canvas renderer and pause/step controls.",
           "Write a GitHub Actions workflow that builds a Rust project, runs clippy and tests, and caches dependencies.",
           "Implement a tokenizer and recursive descent parser for arithmetic expressions with variables in Python.",
           "Write a Java Spring Boot REST controller for CRUD on 'products' with validation and error handling.",
           "Implement a rate limiter middleware in Go using a sliding window log stored in Redis.",
           "Write a Python script that finds duplicate files in a directory tree by size then hash, efficiently."]
for text in codegen:
    add("code-generation", "frontier", text)

filler = ("The committee reviewed the proposal in detail. Section {n} describes the budget allocation, the staffing "
          "plan and the risks identified by the audit, including supplier concentration, currency exposure and "
          "delays in the permitting process. Stakeholders raised concerns about the timeline and the assumptions "
          "behind the revenue forecast. ")
long_tasks = ["Based on the report above, identify the three biggest risks, explain how they interact, and recommend mitigations with trade-offs.",
              "Analyze the document above and list every inconsistency between the budget section and the staffing plan, with references.",
              "Using the full text above, write a critical assessment of the revenue forecast assumptions.",
              "Compare the concerns raised by stakeholders across all sections above and synthesize them into a prioritized action plan.",
              "Read the contract above and identify clauses that conflict with each other; explain the legal implications.",
              "From the meeting transcripts above, reconstruct the decision timeline and explain who changed position and why."]
for i in range(24):
    sections = "".join(filler.format(n=n) for n in range(1, 40 + (i % 6) * 25))
    task = long_tasks[i % len(long_tasks)]
    add("long-context", "frontier", f"{sections}\n\n{task}")

weather_tool = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}}, "required": ["city"]}}}]
db_tools = [{"type": "function", "function": {"name": "run_sql", "description": "Run a read-only SQL query.",
             "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "SQL."}}}}},
            {"type": "function", "function": {"name": "create_ticket", "description": "Open a support ticket.",
             "parameters": {"type": "object", "properties": {"title": {"type": "string", "description": "Title."},
                                                            "priority": {"type": "string", "enum": ["low", "high"], "description": "Priority."}}}}}]
tool_prompts = ["What's the weather in Paris right now?", "Should I bring an umbrella in London tomorrow?",
                "Find the top 5 customers by revenue last quarter and open a high-priority ticket for any with overdue invoices.",
                "Check how many orders failed yesterday and file a ticket if more than 1% failed.",
                "Look up the weather in Tokyo and Osaka and tell me which is warmer.",
                "Query the database for users who signed up this week but never logged in, then create a ticket to follow up.",
                "Get the weather for Berlin, then suggest an outfit.", "Run a query to find duplicate email addresses in the users table.",
                "Compare this month's signups with last month's using the database and summarize the trend.",
                "Is it going to snow in Denver?", "Find all tickets with priority high that are older than 30 days and summarize them.",
                "Pull the revenue by region and create a ticket for the region that declined the most.",
                "What's the temperature in Cairo?", "Check for orders stuck in 'pending' for more than 2 days and escalate them.",
                "Look up the weather in Sydney for my flight tomorrow.", "How many active subscriptions do we have per plan? Use the database.",
                "Investigate why refunds spiked on Monday using the data available and open a ticket with findings.",
                "Tell me the weather in Rome and whether it's a good day for a walking tour.",
                "Run the monthly churn query and flag anything unusual.", "What is the humidity in Singapore right now?"]
for i, text in enumerate(tool_prompts):
    tools = weather_tool if "weather" in text.lower() or "temperature" in text.lower() or "snow" in text.lower() or "humidity" in text.lower() or "umbrella" in text.lower() else db_tools
    add("tool-use", "frontier", text, extra={"tools": tools})

for history_len in range(1, 6):
    add("chit-chat", "cheap", "ok, and what about tomorrow?", history=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}] * history_len)

schema = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": {"type": "object", "properties": {
    "vendor": {"type": "string"}, "total": {"type": "number"}, "lines": {"type": "array"}}}}}
for text in ["Extract a structured invoice from this OCR text and validate totals against line items: 'ACME Corp ... Widget x3 $4.50 ... Gadget x1 $12.00 ... Total $25.50 ... Tax 8% ...' Reconcile any mismatch.",
             "Convert this messy purchase order email into the schema, inferring missing quantities from context and flagging ambiguities.",
             "Parse these three receipts into the schema and reconcile currency differences between them."]:
    add("extraction", "frontier", text, extra={"response_format": schema})

for text in ["What's 15% of 80?", "Convert 5 miles to kilometers.", "What day of the week was 1 January 2000?",
             "Spell 'necessary' backwards.", "Sort these words alphabetically: pear, apple, mango, kiwi",
             "Give me three name ideas for a bakery.", "What rhymes with 'orange'?", "Write a haiku about coffee."]:
    add("lookup", "cheap", text)
for text in ["Explain the trade-offs between microservices and a modular monolith for a 12-person startup, and recommend one with a migration plan.",
             "Critique this business plan's unit economics: CAC $120, churn 6% monthly, ARPU $30, gross margin 70%. Is it viable? Show the math.",
             "Write a detailed threat model for a password manager browser extension, covering attackers, assets and mitigations."]:
    add("algorithm-design", "frontier", text)

path = pathlib.Path(__file__).with_name("routing_prompts.jsonl")
with path.open("w", encoding="utf-8") as out:
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
print(path, len(rows))
