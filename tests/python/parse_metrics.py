"""Parses a Prometheus exposition from stdin with prometheus_client's own parser (the reference)
and prints {"family": {"type": ..., "samples": [[name, labels, value], ...]}} as JSON. Any
format error raises and fails the calling test."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(out))
