"""Tasks with checkable answers for the quality runs: a generated default, SST-2, LLM-Adapters sets.

Every example is a prompt, a few answer strings (``choices``) and the index of
the right one. Training is causal-LM loss on the right answer's tokens after
the prompt; evaluation picks the choice the model finds most likely (the sum
of its tokens' log-probabilities after the prompt), so accuracy is checkable
with no generation and no answer parsing.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class Task:
    name: str
    train: list[Example]
    val: list[Example]  # carved from the training data: settings are chosen on it
    test: list[Example]  # reported once


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def weekday_task(num_train: int = 4000, num_eval: int = 256, seed: int = 0) -> Task:
    """The default task, generated: "Today is Friday. In 3 days it will be" -> " Monday" (7 label words).

    The pretrained SmolLM2-135M-Instruct scores 0% on it zero-shot (it names
    a day, but not the right one), and LoRA on all layers learns it within
    tens of steps, so a short CPU run shows fine-tuning at work. The space is
    small (7 days x offsets 1-6 = 42 questions): validation and test draw
    from the same questions as training, so this measures how fast the
    mapping is learned, not generalisation to unseen questions (the real
    datasets do that).
    """
    rng = random.Random(seed)

    def draw(n: int) -> list[Example]:
        out = []
        for _ in range(n):
            day, offset = rng.randrange(7), rng.randint(1, 6)
            out.append(
                Example(
                    f"Today is {DAYS[day]}. In {offset} days it will be",
                    tuple(" " + d for d in DAYS),
                    (day + offset) % 7,
                )
            )
        return out

    return Task("weekday arithmetic (generated)", draw(num_train), draw(num_eval), draw(num_eval))


def _sst2_file(path: Path) -> list[Example]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, sentence = line.split(" ", 1)
            examples.append(Example(f"Review: {sentence.strip()}\nSentiment:", (" negative", " positive"), int(label)))
    return examples


def _alpaca_choices(item: dict) -> Example:
    match = re.search(r"Answer format: (.+)$", item["instruction"].strip())
    if match is None:
        raise ValueError(f"no 'Answer format:' line in an LLM-Adapters example: {item['instruction'][:80]!r}")
    options = [o.strip() for o in match.group(1).split("/")]
    if item["answer"] not in options:
        raise ValueError(f"answer {item['answer']!r} is not among the options {options}")
    prompt = ALPACA_TEMPLATE.format(instruction=item["instruction"])
    return Example(prompt, tuple(f"the correct answer is {o}" for o in options), options.index(item["answer"]))


def _carve(examples: list[Example], num_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    return examples[num_val:], examples[:num_val]


def load_task(path: str | Path, num_eval: int = 256, seed: int = 0) -> Task:
    """A real dataset.

    * a folder or file of SST-2 (``<label> <sentence>`` lines, ``stsa.binary.train``
      beside ``stsa.binary.dev``): validation carved from train, test = dev;
    * an LLM-Adapters folder with ``train.json`` and ``test.json`` (ARC, OBQA,
      BoolQ; choices "the correct answer is answerN", read from the example's
      "Answer format:" line), or several such folders joined with commas (a mix):
      validation carved from train, test = test.

    ``num_eval`` caps validation and test (test: the first ``num_eval`` after a
    fixed shuffle), so evaluation stays cheap on a CPU.
    """
    parts = [Path(p) for p in str(path).split(",")]
    if len(parts) == 1 and (parts[0].name.startswith("stsa.") or (parts[0] / "stsa.binary.train").exists()):
        folder = parts[0] if parts[0].is_dir() else parts[0].parent
        train, val = _carve(_sst2_file(folder / "stsa.binary.train"), num_eval, seed)
        test = _sst2_file(folder / "stsa.binary.dev")
        random.Random(seed).shuffle(test)
        return Task("SST-2", train, val, test[:num_eval])
    train, val, test = [], [], []
    for folder in parts:
        if not (folder / "train.json").exists() or not (folder / "test.json").exists():
            raise ValueError(
                f"{folder}: expected an SST-2 folder or an LLM-Adapters folder with train.json and test.json"
            )
        items = [_alpaca_choices(x) for x in json.loads((folder / "train.json").read_text(encoding="utf-8"))]
        folder_train, folder_val = _carve(items, num_eval // len(parts), seed)
        folder_test = [_alpaca_choices(x) for x in json.loads((folder / "test.json").read_text(encoding="utf-8"))]
        random.Random(seed).shuffle(folder_test)
        train += folder_train
        val += folder_val
        test += folder_test[: num_eval // len(parts)]
    random.Random(seed).shuffle(train)
    return Task("+".join(p.name for p in parts), train, val, test)
