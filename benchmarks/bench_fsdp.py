"""What FSDP2 costs one rank: the host time of a training step with and without `fully_shard`, in one process.

    python benchmarks/bench_fsdp.py [--layers 24] [--repeats 5]

With one rank nothing is sharded, yet FSDP2 still runs hooks around every layer and makes every parameter and
gradient a DTensor, whose ops cost host time per tensor. This measures that cost where it is not hidden behind a
GPU's work: a Qwen2-shaped model with many small layers (hidden 32; the layer count sets the number of parameter
tensors, 12 per layer), fp32 on the CPU, each phase of a step (3 minibatches of forward and backward, gradient
clipping, the AdamW step, fused and foreach) timed with and without `fully_shard`, interleaved to cancel drift.
The same wrapping as setup_model: each decoder layer, then the root, no reshard after forward.
"""

import statistics
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(layers: int, shard: bool, fused: bool):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import tiny_model

    config = tiny_model.arch_config(
        "qwen2", num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=500,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if shard:
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=False)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)


def time_step(model, optimizer, rows) -> dict[str, float]:
    import torch

    start = time.perf_counter()
    for row in rows:
        model(input_ids=row, labels=row).loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    clipped = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad()
    end = time.perf_counter()
    return {"3 x forward+backward": backward - start, "clip": clipped - backward, "AdamW step": end - clipped}


def main(layers: int = 24, repeats: int = 5, steps: int = 10):
    import torch

    from utils import destroy_distributed, init_distributed

    init_distributed()
    rows = [torch.randint(0, 500, (1, 256)) for _ in range(3)]
    setups = {(shard, fused): build(layers, shard, fused) for shard in (True, False) for fused in (True, False)}
    times = {key: [] for key in setups}
    for _ in range(repeats):
        for key, (model, optimizer) in setups.items():
            time_step(model, optimizer, rows)  # warm: the first DTensor op of a kind propagates its sharding
            times[key].append([time_step(model, optimizer, rows) for _ in range(steps)])
    destroy_distributed()
    n_params = len(list(setups[False, True][0].parameters()))
    print(f"Qwen2 shape, {layers} layers of hidden 32 ({n_params} parameter tensors), fp32, 1 CPU rank; median ms")
    for fused in (True, False):
        print(f"AdamW {'fused' if fused else 'foreach'}:")
        for phase in times[True, fused][0][0]:
            med = {
                shard: statistics.median(step[phase] for run in times[shard, fused] for step in run) * 1e3
                for shard in (True, False)
            }
            print(
                f"  {phase:22} fully_shard {med[True]:7.1f} | none {med[False]:7.1f} | +{med[True] - med[False]:6.1f}"
            )


if __name__ == "__main__":
    typer.run(main)
