"""Train the example adapters shipped in models/examples/, on a CPU.

On SmolLM2-135M-Instruct, each adapter teaches one visible style (pirate speak, all caps, a
French greeting) from a few dozen synthesized chat pairs, in minutes on two cores,
deterministically (fixed seeds, fixed data). At the end it prints base vs adapted greedy
answers to prompts the training never saw. On all-MiniLM-L6-v2, two LoRA classifiers with
their own heads (`minilm-sentiment`, `minilm-topic`) learn from sentences written for this
project (scripts/encoder_examples.py) and print their held-out accuracy.

    python scripts/train_example_adapters.py                  # all adapters
    python scripts/train_example_adapters.py --only pirate --steps 40 --out /tmp/examples
    python scripts/train_example_adapters.py --only minilm-sentiment --only minilm-topic
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even inside PEFT

from peft import (  # noqa: E402
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import PreTrainedTokenizerBase  # noqa: E402

from peft_export.bundle.atomic import staged_dir  # noqa: E402
from peft_export.exporter.base_model import load_base  # noqa: E402

BASE = "smollm2-135m"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "examples"
SEED = 1234
BATCH_SIZE = 8
IGNORE = -100

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Portugal": "Lisbon",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a ripe tomato": "red",
}
ANIMAL_SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars"}
SMALL_TALK = [
    ("Hello!", "Hello, my friend. How can I help you today?"),
    ("How are you?", "I am very well, thank you for asking."),
    ("What is your name?", "My name is SmolLM, and I am happy to meet you."),
    ("Can you help me?", "Yes, I can help you. What do you need?"),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("What do you like to do?", "I like to answer your questions and learn new things."),
    ("Give me some advice.", "Drink water, sleep well and be kind to your friends."),
    ("Where do fish live?", "Fish live in the water of rivers, lakes and the sea."),
    ("Why is the sun hot?", "The sun is hot because it burns hydrogen in its core."),
    ("What is gold?", "Gold is a shiny yellow metal that people use for money and rings."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
]
# Held out of training, so the printed comparison shows generalization, not memory.
EVAL_PROMPTS = [
    "What is the capital of Japan?",
    "Tell me about the moon.",
    "What is 7 plus 5?",
]


def plain_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """Question / plain answer pairs; each adapter restyles the answers."""
    pairs = [
        (f"What is the capital of {c}?", f"The capital of {c} is {v}.") for c, v in CAPITALS.items()
    ]
    pairs += [(f"What color is {t}?", f"{t[0].upper()}{t[1:]} is {c}.") for t, c in COLORS.items()]
    pairs += [(f"What sound does a {a} make?", f"A {a} {s}.") for a, s in ANIMAL_SOUNDS.items()]
    for _ in range(8):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    pairs += SMALL_TALK
    return pairs


PIRATE_WORDS = {
    "is": "be",
    "are": "be",
    "am": "be",
    "the": "th'",
    "you": "ye",
    "your": "yer",
    "my": "me",
    "hello": "ahoy",
    "friend": "matey",
    "friends": "hearties",
    "of": "o'",
    "yes": "aye",
    "money": "treasure",
    "very": "mighty",
    "sea": "briny deep",
}


def _swap_word(match: re.Match[str]) -> str:
    word = match.group(0)
    swapped = PIRATE_WORDS.get(word.lower())
    if swapped is None:
        return word
    return swapped[0].upper() + swapped[1:] if word[0].isupper() else swapped


def pirate_style(answer: str) -> str:
    return f"Arr, matey! {re.sub(r'[A-Za-z]+', _swap_word, answer)} Yo-ho-ho!"


def shouty_style(answer: str) -> str:
    return answer.upper().rstrip(".") + "!"


def french_greeting_style(answer: str) -> str:
    return f"Bonjour ! {answer} Au revoir !"


PIRATE_INIT_TEXT = "Answer like a pirate: start with Arr, matey! and speak like a pirate sailor."


@dataclass(frozen=True)
class ExampleSpec:
    """One shipped example adapter: its PEFT method, the style it learns, how long to train."""

    name: str
    method: str
    style: Callable[[str], str]
    make_config: Callable[[], PeftConfig]
    lr: float
    steps: int
    init_text: str | None = None


SPECS: dict[str, ExampleSpec] = {
    spec.name: spec
    for spec in (
        ExampleSpec(
            name="pirate",
            method="LoRA r=8 on q_proj, v_proj",
            style=pirate_style,
            make_config=lambda: LoraConfig(
                task_type="CAUSAL_LM",
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"],
            ),
            lr=2e-3,
            steps=60,
        ),
        ExampleSpec(
            name="shouty",
            method="DoRA r=8 on q_proj, v_proj, o_proj",
            style=shouty_style,
            make_config=lambda: LoraConfig(
                task_type="CAUSAL_LM",
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                use_dora=True,
                target_modules=["q_proj", "v_proj", "o_proj"],
            ),
            lr=2e-3,
            steps=50,
        ),
        ExampleSpec(
            name="french-greeting",
            method="IA3 on k_proj, v_proj, down_proj",
            style=french_greeting_style,
            make_config=lambda: IA3Config(
                task_type="CAUSAL_LM",
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
            ),
            lr=3e-2,
            steps=40,
        ),
        ExampleSpec(
            name="prefix-pirate",
            method="prefix tuning, 16 virtual tokens, initialized from a text's keys/values",
            style=pirate_style,
            make_config=lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
            lr=1e-2,
            steps=50,
            init_text=PIRATE_INIT_TEXT,
        ),
        ExampleSpec(
            name="prompt-pirate",
            method="prompt tuning, 16 virtual tokens, initialized from text",
            style=pirate_style,
            make_config=lambda: PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="RANDOM"
            ),
            lr=1e-2,
            steps=60,
            init_text=PIRATE_INIT_TEXT,
        ),
    )
}


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], style: Callable[[str], str]
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) with the loss on the styled answer and its end-of-turn token only."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for question, answer in pairs:
        prompt = chat_prompt_ids(tokenizer, question)
        reply = tokenizer.encode(style(answer), add_special_tokens=False) + [end_of_turn]
        examples.append((prompt + reply, [IGNORE] * len(prompt) + reply))
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def greedy_answer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, max_new: int = 24
) -> str:
    """Greedy decoding by re-running the whole sequence each step (no KV cache).

    PeftModel.generate drops prefix-tuning prefixes and drifts for prompt tuning with
    peft 0.21.2 + transformers 5.24, so every adapter is compared through its plain forward.
    """
    ids = chat_prompt_ids(tokenizer, question)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generated: list[int] = []
    for _ in range(max_new):
        input_ids = torch.tensor([ids + generated])
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        token = int(logits[0, -1].argmax())
        if token == end_of_turn:
            break
        generated.append(token)
    return tokenizer.decode(generated)


def _repeat_to(token_ids: list[int], count: int) -> list[int]:
    return (token_ids * (count // len(token_ids) + 1))[:count]


def init_prompt_from_text(model: PeftModel, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Start the virtual tokens at the embeddings of `text` (repeated to length).

    Done here rather than with PEFT's TEXT init so the saved config does not name a local
    tokenizer path that other machines lack; the trained weights replace the init anyway.
    """
    embedding = model.prompt_encoder["default"].embedding
    token_ids = _repeat_to(
        tokenizer.encode(text, add_special_tokens=False), embedding.num_embeddings
    )
    words = model.get_input_embeddings().weight
    embedding.weight.data.copy_(words[torch.tensor(token_ids)].detach())


@torch.no_grad()
def init_prefix_from_text(model: PeftModel, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Start the prefix at the keys/values the base model computes for `text`.

    PEFT's random prefix starts far from any real key/value (loss ~9 on SmolLM2) and takes
    many more CPU steps to recover; a real text's cache starts near the base model.
    """
    embedding = model.prompt_encoder["default"].embedding
    count = embedding.num_embeddings
    token_ids = _repeat_to(tokenizer.encode(text, add_special_tokens=False), count)
    cache = model.get_base_model()(input_ids=torch.tensor([token_ids]), use_cache=True)
    layers = cache.past_key_values.layers
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])
    # [layers, 2, kv_heads, tokens, head_dim] -> PEFT's row layout [tokens, layers*2*heads*dim]
    embedding.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(count, -1))


def train_one(spec: ExampleSpec, steps: int, out_root: Path) -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    loaded = load_base(BASE)
    tokenizer = loaded.tokenizer
    base_answers = {q: greedy_answer(loaded.model, tokenizer, q) for q in EVAL_PROMPTS}

    model = get_peft_model(loaded.model, spec.make_config())
    if spec.init_text is not None:
        prefix = model.peft_config["default"].peft_type == "PREFIX_TUNING"
        init = init_prefix_from_text if prefix else init_prompt_from_text
        init(model, tokenizer, spec.init_text)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{spec.name}] {spec.method}: {trainable:,} trainable parameters, {steps} steps")

    examples = encode_examples(tokenizer, plain_pairs(rng), spec.style)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 5) * max(0.1, 1 - step / steps)
    )
    model.train()
    order: list[int] = []
    started = time.monotonic()
    for step in range(1, steps + 1):
        if len(order) < BATCH_SIZE:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(BATCH_SIZE)]
        loss = model(**collate(batch, tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            elapsed = time.monotonic() - started
            print(f"[{spec.name}] step {step:3d}/{steps} loss {loss.item():.3f} {elapsed:5.0f}s")
    model.eval()

    for question in EVAL_PROMPTS:
        print(f"[{spec.name}] Q: {question}")
        print(f"    base:    {base_answers[question]!r}")
        print(f"    adapted: {greedy_answer(model, tokenizer, question)!r}")
    save_adapter(model, out_root / spec.name)


def save_adapter(model: PeftModel, target: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors only, atomically."""
    model.peft_config["default"].base_model_name_or_path = BASE
    with staged_dir(target, overwrite=True) as stage:
        model.save_pretrained(stage, save_embedding_layers=False)
        (stage / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"saved {target} ({size / 1e6:.2f} MB)")


ENCODER_BASE = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ClassifierSpec:
    """An example LoRA classifier on MiniLM: its labels and written sentences."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    held_out: list[tuple[str, int]]
    steps: int = 60
    lr: float = 3e-3


def _classifier_specs() -> dict[str, ClassifierSpec]:
    import encoder_examples as ex

    return {
        spec.name: spec
        for spec in (
            ClassifierSpec(
                "minilm-sentiment", ex.SENTIMENT_LABELS, ex.SENTIMENT_TRAIN, ex.SENTIMENT_HELD_OUT
            ),
            ClassifierSpec("minilm-topic", ex.TOPIC_LABELS, ex.TOPIC_TRAIN, ex.TOPIC_HELD_OUT),
        )
    }


def train_classifier(spec: ClassifierSpec, steps: int, out_root: Path) -> None:
    """LoRA r=8 on query/value plus a trained classifier head (PEFT's modules_to_save)."""
    import json

    from transformers import AutoTokenizer

    from peft_export.exporter.encoders.base import load_task_model
    from peft_export.exporter.encoders.export import encoder_checkpoint

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    folder = encoder_checkpoint(ENCODER_BASE)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base, _ = load_task_model(folder, "sequence-classification", num_labels=len(spec.labels))
    with torch.no_grad():  # load_task_model zeroes a fresh head; training needs a random one
        base.classifier.weight.normal_(0.0, 0.02)
    config = LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]
    )
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{spec.name}] LoRA r=8 + head: {trainable:,} trainable parameters, {steps} steps")
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0
    )
    model.train()
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < BATCH_SIZE:
            order += rng.sample(range(len(spec.train)), len(spec.train))
        batch = [spec.train[order.pop()] for _ in range(BATCH_SIZE)]
        inputs = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"[{spec.name}] step {step:3d}/{steps} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        inputs = tokenizer([t for t, _ in spec.held_out], padding=True, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1).tolist()
    right = sum(int(p == y) for p, (_, y) in zip(predicted, spec.held_out, strict=True))
    print(f"[{spec.name}] held-out accuracy {right}/{len(spec.held_out)}")
    model.peft_config["default"].base_model_name_or_path = ENCODER_BASE
    target = out_root / spec.name
    with staged_dir(target, overwrite=True) as stage:
        model.save_pretrained(stage)
        (stage / "README.md").unlink(missing_ok=True)
        (stage / "labels.json").write_text(json.dumps(spec.labels) + "\n")
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"saved {target} ({size / 1e6:.2f} MB)")


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    classifiers = _classifier_specs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=sorted([*SPECS, *classifiers]), action="append", help="repeatable"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, help="override every adapter's step count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (shared CPU: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for name in args.only or [*SPECS, *classifiers]:
        started = time.monotonic()
        if name in classifiers:
            train_classifier(classifiers[name], args.steps or classifiers[name].steps, args.out)
        else:
            train_one(SPECS[name], args.steps or SPECS[name].steps, args.out)
        print(f"[{name}] done in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
