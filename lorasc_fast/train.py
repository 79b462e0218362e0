"""The fine-tuning loop shared by ``lorasc demo`` and ``bench/ablation.py``.

A sentence classifier = a (PEFT-adapted) encoder, mean pooling over the attention mask, a
linear head: ``logits = head(Σ_t mask_t·h_t / Σ_t mask_t)``. LoRA (or DoRA) adapters sit on
the attention ``query``/``value`` projections; the head is trained fully (``modules_to_save``).

:func:`fit` trains plain LoRA (one expert: a single LR decay over all steps) or LoRASC
(``experts`` > 0: the steps are cut into ``experts`` equal runs; at each cut ``LoRASC.step``
merges the slow expert into the base weights, adds noise, re-initialises the fast LoRA and
clears its optimizer state, and the LR schedule restarts; ``LoRASC.finish`` merges the last).

Inputs are tokenised once (:func:`encode`: truncated to ``max_len``, padded to the longest);
each batch is cut to its own longest item and evaluation runs shortest first, so padding costs
little. Memory: an encoded set is 2·N·max_len int64 at most (10k snippets × 64 ≈ 10 MB).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SentenceClassifier", "Encoded", "encode", "load_tokenizer", "load_classifier", "make_optimizer",
           "fit", "evaluate"]


class SentenceClassifier(nn.Module):
    """Encoder + masked mean pooling + dropout + linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


@dataclass
class Encoded:
    """Token ids / attention mask (N × L, right padded) and labels (N) of one data split."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx`` cut to their longest item, moved to ``device``."""
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())
        return (self.input_ids[idx, :width].to(device, non_blocking=True),
                mask[:, :width].to(device, non_blocking=True), self.labels[idx].to(device, non_blocking=True))


def encode(tokenizer, examples, max_len: int = 64) -> Encoded:
    """Tokenise ``examples`` (:class:`lorasc_fast.data.Examples`) once, truncated to ``max_len``."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    tok = tokenizer(list(examples.texts), truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
    return Encoded(tok["input_ids"], tok["attention_mask"], torch.tensor(examples.labels, dtype=torch.long))


def load_tokenizer(model_dir=None):
    """The packaged all-MiniLM-L6-v2 tokenizer (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from .data import minilm_path

    return AutoTokenizer.from_pretrained(str(model_dir or minilm_path()))


def load_classifier(num_labels: int, *, rank: int = 8, lora_alpha: int | None = None, use_dora: bool = False,
                    seed: int = 0, model_dir=None):
    """PEFT model: all-MiniLM-L6-v2 + linear head, LoRA r=``rank`` on query/value (offline).

    ``lora_alpha`` defaults to 2·rank (PEFT scaling 2). Head and LoRA A are initialised from
    ``torch.manual_seed(seed)``. Memory: 22.7M frozen + 2·6·2·r·384 LoRA + head parameters.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from .data import minilm_path

    path = str(model_dir or minilm_path())
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    torch.manual_seed(seed)
    model = SentenceClassifier(encoder, num_labels)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                        use_dora=use_dora, modules_to_save=["head"])
    return get_peft_model(model, config)


def make_optimizer(model: nn.Module, lr: float, *, loraplus_ratio: float = 1.0, weight_decay: float = 0.0):
    """AdamW over the trainable parameters; ``lora_B`` at ``lr·loraplus_ratio`` (LoRA+ uses 16)."""
    if lr <= 0 or loraplus_ratio <= 0:
        raise ValueError(f"lr and loraplus_ratio must be > 0, got {lr}, {loraplus_ratio}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = [p for n, p in named if "lora_B" in n]
    rest = [p for n, p in named if "lora_B" not in n]
    groups = [{"params": rest, "lr": lr}, {"params": b, "lr": lr * loraplus_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def fit(model: nn.Module, data: Encoded, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
        experts: int | None = None, alpha: float = 0.8, noise_lambda: float = 1.0, loraplus_ratio: float = 1.0,
        warmup_steps: int = 0, schedule: str = "linear", device="cpu", amp: bool = False,
        progress: bool = False, desc: str = "train") -> dict:
    """Train ``model`` in place; returns ``{"steps", "experts", "steps_per_expert", "train_loss", "seconds"}``.

    ``experts=None``: plain LoRA, one LR decay over all ``epochs·⌈N/batch_size⌉`` steps.
    ``experts=k``: LoRASC with a boundary every ``steps/k`` steps (``k`` must divide the step
    count; ``k = epochs`` is the paper's once-per-epoch cascade); the LR schedule restarts at
    each boundary and ``LoRASC.finish`` merges the k-th expert.
    """
    from tqdm.auto import tqdm

    from lorasc_fast import LoRASC, cascade_schedule

    if epochs < 1 or batch_size < 1 or len(data) == 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and data, got {epochs}, {batch_size}, {len(data)}")
    device = torch.device(device)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * steps_per_epoch
    if experts is not None and (experts < 1 or total % experts):
        raise ValueError(f"experts must divide the {total} optimizer steps, got {experts}")
    per_expert = total if experts is None else total // experts
    model.to(device).train()
    optimizer = make_optimizer(model, lr, loraplus_ratio=loraplus_ratio)
    scheduler = cascade_schedule(optimizer, per_expert, warmup_steps=warmup_steps, kind=schedule)
    cascade = None
    if experts is not None:
        every = "epoch" if per_expert == steps_per_epoch else per_expert
        cascade = LoRASC(model, alpha=alpha, noise_lambda=noise_lambda, seed=seed, every=every)
    shuffle = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    start, step, running = time.perf_counter(), 0, []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=shuffle).split(batch_size):
            ids, mask, labels = data.batch(idx, device)
            with _autocast(device, amp):
                loss = loss_fn(model(input_ids=ids, attention_mask=mask).float(), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running.append(loss.detach())
            if cascade is not None and step % per_expert == 0 and step < total:
                cascade.step(optimizer)
            if progress and (step % 20 == 0 or step == total):
                bar.set_postfix(loss=f"{torch.stack(running[-20:]).mean().item():.3f}", refresh=False)
            bar.update(1)
    bar.close()
    if cascade is not None:
        cascade.finish()
    last = running[-steps_per_epoch:]
    return {"steps": total, "experts": experts or 1, "steps_per_expert": per_expert,
            "train_loss": float(torch.stack(last).float().mean()), "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int = 256, device="cpu", amp: bool = False,
             progress: bool = False, desc: str = "eval") -> float:
    """Accuracy of ``model`` on ``data``; items are run shortest first to cut padding."""
    from tqdm.auto import tqdm

    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty set")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    order = torch.argsort(data.attention_mask.sum(1), stable=True)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for idx in tqdm(order.split(batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        ids, mask, labels = data.batch(idx, device)
        with _autocast(device, amp):
            correct += (model(input_ids=ids, attention_mask=mask).argmax(-1) == labels).sum()
    model.train(was_training)
    return correct.item() / len(data)
