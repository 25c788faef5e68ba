"""The built-in tiny model: a locally trained byte-level BPE tokenizer and tiny causal LMs built from a config.

Nothing here touches a model hub. Tests, the demo and the benchmarks call `build_model(dir)` and then load the
folder back through the real `from_pretrained` path, exactly as a user's model would be loaded.

    python tiny_model.py OUT_DIR [--arch qwen2|llama] [--conversations N]

writes a model folder (weights, config, tokenizer) and, with --conversations, a messages JSONL beside it.
"""

import functools
import json
import os
import random
from pathlib import Path

import typer

# Qwen2's pre-tokenizer split. transformers 5 loads a `qwen2` folder with Qwen2Tokenizer, which rebuilds this
# normalizer and pre-tokenizer whatever tokenizer.json says: training with the same ones keeps ids identical
# whichever route loads the tokenizer (see tests/test_tiny_model.py).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 4000
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# ChatML, with Qwen3-style reasoning: `<think>` wraps `reasoning_content` inside the assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The same ChatML with `{% generation %}` tags around each assistant turn (through `<|im_end|>`): renders the
# same text; for peers (TRL's assistant-only loss) and tests that rely on transformers' assistant masks.
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}"
    "{%- if message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3 header style: a BOS, role headers, `<|eot_id|>` ends each turn, no newline after it.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{- '<think>' + message['reasoning_content'] + '</think>' }}"
    "{%- endif %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TEMPLATES = {
    "chatml": dict(chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "llama3": dict(
        chat_template=LLAMA3_TEMPLATE, eos_token="<|eot_id|>", pad_token="<|endoftext|>", bos_token="<|begin_of_text|>"
    ),
}

ARCHS = {
    # ~1.5M parameters: hidden 128, 2 layers, vocab 4000 (the shape the peers were measured on, shared/NOTES.md).
    "qwen2": dict(template="chatml"),
    "llama": dict(template="llama3"),
}

_SYLLABLES = (
    "ka lo mi ne su ta ri po ve da ze bu fi go ha ju ke li mo na pe qu ra si to um va we xi yo zo an el in on".split()
)


def _words(rng: random.Random, n: int) -> list[str]:
    """Pseudo-words with a Zipf-like frequency, so BPE has real structure to learn."""
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _lexicon() -> tuple[str, ...]:
    return tuple(_words(random.Random(1234), 20000))


def make_text(rng: random.Random, num_words: int) -> str:
    lex = _lexicon()
    words = []
    for _ in range(num_words):
        word = (
            lex[min(int(rng.paretovariate(0.7)) - 1, len(lex) - 1)] if rng.random() < 0.9 else str(rng.randint(0, 999))
        )
        if rng.random() < 0.08:
            word += rng.choice([".", ",", "?", "!", ":", "\n"])
        if rng.random() < 0.05:
            word = word.capitalize()
        words.append(word)
    return " ".join(words)


def _corpus() -> list[str]:
    rng = random.Random(0)
    lex = list(_lexicon())
    return [make_text(rng, rng.randint(5, 200)) for _ in range(4000)] + [
        " ".join(lex[i : i + 50]) for i in range(0, len(lex), 50)
    ]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (about a second) and return it serialized."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(out_dir: str | os.PathLike, template: str = "chatml"):
    """Save a tiny tokenizer with the given chat template style ("chatml" or "llama3") to out_dir."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), **TEMPLATES[template])
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def model_config(arch: str = "qwen2", **overrides):
    """A tiny config of the given architecture; overrides set any config field (e.g. hidden_size=896)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=3,
        eos_token_id=2 if arch == "qwen2" else 6,
        pad_token_id=0,
        use_cache=False,
    )
    common.update(overrides)
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def arch_config(model_type: str, **overrides):
    """A tiny config of any Hugging Face decoder architecture by its `model_type` (gemma2, mistral, granite, ...),
    with this tokenizer's vocabulary; overrides set any config field (sliding_window=16, ...)."""
    from transformers import AutoConfig

    common = model_config("qwen2").to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    keep += ("pad_token_id", "use_cache")
    return AutoConfig.for_model(model_type, **{k: common[k] for k in keep} | overrides)


def build_model(out_dir: str | os.PathLike, arch: str = "qwen2", seed: int = 0, dtype: str = "float32", **overrides):
    """Build a randomly initialised causal LM plus its tokenizer and save both to out_dir (a model folder)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir, ARCHS[arch]["template"])
    config = model_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    return out_dir


def make_conversations(n: int, seed: int = 0, max_words: int = 400) -> list[dict]:
    """Synthetic chat samples with long-tailed lengths: system prompts, 1-4 turns, reasoning, tool turns."""
    rng = random.Random(seed)

    def text() -> str:
        return make_text(rng, min(max_words, max(1, int(rng.lognormvariate(3.3, 0.9)))))

    samples = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.1:
                messages.append({"role": "assistant", "content": text()})
                messages.append({"role": "tool", "content": text()})
            reply = {"role": "assistant", "content": text()}
            if rng.random() < 0.2:
                reply["reasoning_content"] = text()
            messages.append(reply)
        samples.append({"messages": messages})
    return samples


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def main(
    out_dir: Path = typer.Argument(..., help="Folder to write the model (weights, config, tokenizer) to."),
    arch: str = typer.Option("qwen2", help="Architecture: qwen2 (ChatML template) or llama (Llama-3 template)."),
    hidden_size: int = typer.Option(128, help="Hidden size."),
    num_hidden_layers: int = typer.Option(2, help="Number of decoder layers."),
    conversations: int = typer.Option(
        0, help="Also write this many synthetic conversations to OUT_DIR/messages.jsonl."
    ),
    seed: int = typer.Option(0, help="Seed for the weights and the conversations."),
):
    """Write a tiny model folder that loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained."""
    if arch not in ARCHS:
        raise typer.BadParameter(f"{arch!r} is not one of {', '.join(sorted(ARCHS))}", param_hint="--arch")
    build_model(out_dir, arch=arch, seed=seed, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    if conversations:
        write_jsonl(out_dir / "messages.jsonl", make_conversations(conversations, seed=seed))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    typer.run(main)
