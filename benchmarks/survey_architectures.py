"""Which Hugging Face causal-LM architectures leantrain trains exactly, and how: a survey, not a test.

    python benchmarks/survey_architectures.py                      # every model type transformers registers
    python benchmarks/survey_architectures.py mamba,falcon,qwen2   # some

For each model type: a tiny random model from its config (tiny_model.arch_config; above 30M parameters skipped),
set up as train.py does (1 process, CPU, fp32, --attn-implementation auto, --loss auto), then the summed loss of
one packed row of 10 random sequences (20-120 tokens, every token a target) against the model's own eager forward
run on each sequence alone. Prints what the setup chose (attention, loss, packed row or padded batch) and the
relative difference, or the one-line error where leantrain refuses the model.
"""

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import setup_model  # noqa: E402
import tiny_model  # noqa: E402
import train  # noqa: E402
from dataset import TokenizedData  # noqa: E402
from packing import collate  # noqa: E402
from utils import UserError, destroy_distributed, first_line, init_distributed  # noqa: E402

MAX_PARAMS = 30e6


def random_sequences(vocab_size: int, n: int = 10, seed: int = 0) -> TokenizedData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 121, n)
    ids = rng.integers(0, vocab_size, int(lengths.sum())).astype(np.int32)
    return TokenizedData(
        input_ids=ids,
        labels=ids.copy(),
        position_ids=np.concatenate([np.arange(k) for k in lengths]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        num_loss_counted_tokens=lengths - 1,
        source_lines=np.arange(1, n + 1),
    )


def separate_loss(lm, data: TokenizedData) -> float:
    """The model's own eager forward on each sequence alone, cross-entropy of its next-token logits."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(data.offsets) - 1):
            mb = collate(data, [i])
            logits = lm(input_ids=mb.input_ids, use_cache=False).logits[0, mb.target_index]
            total += F.cross_entropy(logits.float(), mb.target_ids, reduction="sum").item()
    return total


def survey(model_type: str, dist, folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    config = tiny_model.arch_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMS:
        return f"skipped: {size / 1e6:.0f}M parameters at the tiny size"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    lm.save_pretrained(folder)
    data = random_sequences(config.get_text_config().vocab_size)
    reference = separate_loss(lm, data)
    cfg = train.TrainConfig(
        model_name_or_path=str(folder), data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64
    )
    cfg.compute_dtype = "float32"
    with contextlib.redirect_stdout(io.StringIO()):
        model = setup_model.setup_model(cfg, dist, setup_model.check_model_path(str(folder)))
    model.eval()
    with torch.no_grad():
        packed = model(**collate(data, list(range(len(data.offsets) - 1))).inputs("cpu")).total.item()
    how = "padded batch" if model.padded else "packed row"
    return f"{cfg.attn_implementation:24} {cfg.loss:8} {how:12} {packed / reference - 1:+.1e}"


def main(model_types: list[str]):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    dist = init_distributed()
    print(f"{'model type':22} {'attention':24} {'loss':8} {'runs as':12} packed / separate - 1")
    try:
        for model_type in model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            with tempfile.TemporaryDirectory() as folder:
                try:
                    result = survey(model_type, dist, Path(folder))
                except UserError as e:
                    result = f"refused: {e}"
                except Exception as e:  # a config this tiny size cannot build, a model that needs other inputs...
                    result = f"not surveyed: {type(e).__name__}: {first_line(e)[:120]}"
            print(f"{model_type:22} {result}", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    main([t for t in ",".join(sys.argv[1:]).split(",") if t])
