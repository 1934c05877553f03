"""Prompt files for evaluation: JSON Lines with a `prompt` field, or plain text, one per line."""

from __future__ import annotations

import json


def read_prompts(path: str) -> list[str]:
    """Prompts from a JSON Lines file (field `prompt`) or a text file (one prompt per line)."""
    prompts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{line_no}: field 'prompt' missing or not a string")
                prompts.append(row["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
