"""The start-up probe: forwards of tiny packed rows through the set-up model decide what cannot be known in advance
(the attention that runs, packed rows or padded batches, the loss)."""

import torch

from attention import PER_SEQUENCE, VARLEN, AttentionNotSupported, own_attention, packed_rows_cannot, text_config
from utils import fail, first_line, log

PROBE_LENGTHS = (12, 9)  # the two probe sequences; every token but the first of each is a target


def probe_rows(vocab_size: int):
    """Two tiny packed rows holding the same two random sequences (PROBE_LENGTHS tokens), one in each order, and a
    row of the first alone, through the real collator."""
    import numpy as np

    from dataset import TokenizedData
    from packing import collate

    lengths = PROBE_LENGTHS
    ids = np.random.default_rng(0).integers(0, vocab_size, sum(lengths)).astype(np.int32)
    data = TokenizedData(
        input_ids=ids,
        labels=ids.copy(),
        position_ids=np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        offsets=np.array([0, lengths[0], sum(lengths)]),
        num_loss_counted_tokens=np.array([n - 1 for n in lengths]),
        source_lines=np.array([1, 2]),
    )
    return collate(data, [0, 1]), collate(data, [1, 0]), collate(data, [0])


def probe_forwards(model, rows) -> list[tuple]:
    """(the model's own logits, the loss path's logits) at the targets of each probe row. Each forward, finished or
    failed, leaves the model resharded."""
    from setup_model import reshard  # at call time: setup_model imports this module

    outputs = []
    for row in rows:
        try:
            with torch.no_grad():
                own, ours = model(**row)
        finally:
            reshard(model)
        outputs.append((own.float(), ours))
    return outputs


def mixing(outputs) -> float:
    """How far each sequence's logits move when the two probe sequences swap places in the row, relative to the
    largest logit. Both rows have the same shapes and so run the same kernels: a model that keeps the sequences of a
    packed row apart scores ~0; one that leaks across them, or counts positions along the row, does not."""
    (ab, _), (ba, _) = outputs
    second = PROBE_LENGTHS[1] - 1  # the second sequence's targets, first in `ba`
    return moved_by(ab, torch.cat([ba[second:], ba[:second]]))


def moved_by(logits, other) -> float:
    """The largest difference between two sets of logits, relative to the first's largest logit."""
    return float((logits - other).abs().max() / logits.abs().max().clamp(min=1e-6))


MIXING_TOLERANCE = 1e-3
# How far the chunked or Liger loss's logits may stray from the model's own, relative to the largest: the two
# round differently in 16-bit compute, and agree to ~1e-6 in fp32 (a forgotten soft-cap moves them ~1e-3).
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


def check_rows(model, rows) -> tuple[list | None, str | None]:
    """(probe outputs, None) if the model runs the probe rows and keeps their two sequences apart, else (None, what
    goes wrong). An attention function that refuses the model raises AttentionNotSupported."""
    try:
        outputs = probe_forwards(model, rows)
    except AttentionNotSupported:
        raise
    except Exception as e:  # e.g. transformers refusing packed rows for a layer type it cannot split
        return None, f"fails ({first_line(e)})"
    if (moved := mixing(outputs)) > MIXING_TOLERANCE:
        return None, f"mixes the two sequences (their logits move {moved:.1e} when they swap places)"
    return outputs, None


def positions_moved(model, row) -> float:
    """How far the logits of a one-sequence row move when the model numbers its positions itself instead of being
    given the collator's 0-based position_ids, relative to the largest."""
    (given, _), *_ = probe_forwards(model, [row])
    model.own_positions = True
    try:
        (own, _), *_ = probe_forwards(model, [row])
    except Exception:  # a model that cannot do without position_ids takes the collator's
        return 0.0
    finally:
        model.own_positions = False
    return moved_by(given, own)


def use_attention(model, cfg, name: str):
    cfg.attn_implementation = name
    model.lm.set_attn_implementation(name)


def probe_model(model, cfg, dist, config, requested: tuple[str, str]):
    """Forwards of two tiny packed rows before training, for what cannot be known in advance (`requested` is the
    (attention, loss) the user asked for; `auto` falls back, a named choice that cannot be kept fails):
    - the attention function must get what it needs, else eager (transformers' own, masks from position_ids);
    - the model must keep the sequences of a packed row apart (Mamba's convolutions and state, Falcon's masks,
      positions counted along the row do not; nor, by its config, Llama 4's query scaling on rows past floor_scale)
      and take 0-based position_ids (RoBERTa-style models do not), else each minibatch runs as a padded batch, one
      sequence per row (numbering its positions itself where it must);
    - chunked and liger, which apply the LM head and the logit transform themselves, must match the model's own
      logits, else the model's own forward computes the loss."""
    *rows, alone = [mb.inputs(dist.device) | {"target_ids": None} for mb in probe_rows(text_config(config).vocab_size)]
    name = type(model.lm).__name__
    model.eval()  # no dropout: the checks compare forwards
    try:
        outputs, problem = check_rows(model, rows)
    except AttentionNotSupported as e:
        if requested[0] != "auto":
            fail(f"--attn-implementation {cfg.attn_implementation}: {e}; use --attn-implementation eager")
        log(f"attention {cfg.attn_implementation}: {e}; using eager")
        use_attention(model, cfg, "eager")
        outputs, problem = check_rows(model, rows)
    problem = problem or packed_rows_cannot(config, cfg.max_tokens_per_gpu)
    if not problem and (moved := positions_moved(model, alone)) > MIXING_TOLERANCE:
        problem = f"needs positions numbered its own way (its logits move {moved:.1e} given 0-based position_ids)"
        model.own_positions = True
    if problem:
        message = f"{name} on a packed row {problem}"
        if cfg.attn_implementation in (VARLEN, PER_SEQUENCE):
            if requested[0] != "auto":
                fail(f"--attn-implementation {cfg.attn_implementation}: {message}; use --attn-implementation auto")
            use_attention(model, cfg, own_attention(config))
        log(f"packing: {message}; training on padded batches instead, attention {cfg.attn_implementation} (slower)")
        model.padded = True
        outputs, problem = check_rows(model, rows)
        if problem:
            fail(f"--model-name-or-path {cfg.model_name_or_path}: {name} on a padded batch {problem}")
    model.train()
    own, ours = outputs[0]
    own_max = float(own.abs().max()) + 1e-6
    if model.loss == "model" or torch.allclose(own, ours, rtol=0, atol=LOSS_TOLERANCE[cfg.compute_dtype] * own_max):
        return
    message = f"the model's logits are not its LM head's output under {model.transform}"
    if requested[1] != "auto":
        fail(f"--loss {cfg.loss}: {message}; use --loss model")
    log(f"loss: {message}; using the model's own forward (--loss model)")
    model.loss = cfg.loss = "model"
