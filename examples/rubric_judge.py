#!/usr/bin/env python3
"""A reference judge for smelt's rubric rewards (reward = "rubric"), standard library only.

smelt starts it once per run (rubric.judge_command = ["python3", "examples/rubric_judge.py"])
and writes one JSON request per line on its stdin:

    {"id": 0, "prompt": "...", "response": "...", "answer": "...",
     "criteria": [{"criterion": "...", "weight": 1.0, "factual": true, "pattern": "42"}, ...]}

It must answer each with one line on stdout, in order, flushed at once:

    {"id": 0, "passed": [true, false, ...]}

This one passes a criterion when the response (the text after </think> for factual criteria,
the whole response otherwise) contains the criterion's `pattern`, or, without a pattern, every
word of the criterion longer than three letters. Replace `verdict` with a call to an LLM judge
to grade free-text criteria; keep the one-line-per-request, flush-per-line contract.
"""

import json
import sys


def verdict(criterion, response):
    text = response.split("</think>")[-1] if criterion.get("factual") else response
    pattern = criterion.get("pattern")
    if pattern:
        return pattern in text
    words = [w for w in criterion["criterion"].lower().split() if len(w) > 3]
    return all(w in text.lower() for w in words)


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        passed = [verdict(c, request["response"]) for c in request["criteria"]]
        print(json.dumps({"id": request["id"], "passed": passed}), flush=True)


if __name__ == "__main__":
    main()
