"""LoRASCCallback end to end in a transformers Trainer on a tiny Llama (CPU): boundaries,
optimizer-state reset, schedule restarts, checkpoints with the cascade state, resume."""
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from lorasc_fast import LoRASCCallback, cascade_schedule
from lorasc_fast.trainer import STATE_NAME
from helpers import tiny_llama

LR = 1e-2
N_EXAMPLES, BATCH, EPOCHS = 8, 2, 2  # 4 optimizer steps per epoch, 8 in all


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (N_EXAMPLES, 6), generator=g)

    def __len__(self):
        return N_EXAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model():
    torch.manual_seed(0)
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    return get_peft_model(base, config)


class Probe(TrainerCallback):
    """Runs after LoRASCCallback: records the optimizer state of fast / head params per step."""

    def __init__(self, lorasc):
        self.lorasc, self.fast_has_state, self.head_has_state = lorasc, {}, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        fast = self.lorasc.cascade.fast_parameters()
        ids = {id(p) for p in fast}
        head = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in ids]
        self.fast_has_state[state.global_step] = any(p in optimizer.state for p in fast)
        self.head_has_state[state.global_step] = bool(head) and all(p in optimizer.state for p in head)


def make_trainer(out, model, callback, *, optimizers=(None, None), eval_dataset=None, **extra):
    kw = dict(num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=LR,
              lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.0, save_strategy="steps",
              save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
              disable_tqdm=True, dataloader_num_workers=0)
    args = TrainingArguments(output_dir=str(out), **{**kw, **extra})
    return Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=eval_dataset,
                   callbacks=[callback], optimizers=optimizers)


def logged_lrs(trainer):
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


@pytest.mark.parametrize("every,span", [("epoch", 4), (3, 3)])
def test_trainer_end_to_end(every, span, tmp_path):
    model = tiny_model()
    callback = LoRASCCallback(alpha=0.6, noise_lambda=1.0, every=every, seed=3)
    probe = Probe(callback)
    trainer = make_trainer(tmp_path, model, callback)
    trainer.add_callback(probe)
    trainer.train()
    cascade = callback.cascade
    total = N_EXAMPLES // BATCH * EPOCHS
    boundaries = [s for s in range(1, total) if s % span == 0]
    assert cascade.finished and cascade.boundaries == len(boundaries)
    # optimizer state of exactly the fast factors is dropped at each boundary
    assert [s for s, has in probe.fast_has_state.items() if not has] == boundaries
    assert all(probe.head_has_state.values())
    # the LR schedule (1 warmup step, linear decay) restarts with every expert
    factors = [0.0] + [1 - k / (span - 1) for k in range(span - 1)]
    expected = [LR * factors[(s - 1) % span] for s in range(1, total + 1)]
    assert logged_lrs(trainer) == pytest.approx(expected)
    # every checkpoint carries the cascade state
    for step in range(2, total + 1, 2):
        state = torch.load(tmp_path / f"checkpoint-{step}" / STATE_NAME, weights_only=True)
        assert state["boundaries"] == len([b for b in boundaries if b <= step])
        assert state["base_weights"].keys() == state["slow"].keys()
    # after the final merge the adapter is a no-op: merge_and_unload is the trained model
    assert all(not layer.module.lora_B["default"].weight.any() for layer in cascade.layers)
    ids = Tokens().ids[:3]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("step", [4, 5])
def test_trainer_resume_is_exact(step, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    model = tiny_model()
    make_trainer(full_dir, model, LoRASCCallback(seed=5), save_steps=1).train()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model = tiny_model()
    ckpt = full_dir / f"checkpoint-{step}"
    if step == 4:  # the checkpoint lives in the new run's output_dir: found by default
        shutil.copytree(ckpt, resumed_dir / ckpt.name)
        callback, resume = LoRASCCallback(seed=5), str(resumed_dir / ckpt.name)
    else:  # elsewhere: named explicitly
        callback, resume = LoRASCCallback(seed=5, resume_from=str(ckpt)), str(ckpt)
    make_trainer(resumed_dir, model, callback, save_steps=1).train(resume_from_checkpoint=resume)
    assert callback.cascade.boundaries == 1 and callback.cascade.finished
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


def test_user_cascade_schedule_is_kept_and_missing_state_is_an_error(tmp_path):
    def own_schedule(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        return optimizer, cascade_schedule(optimizer, 4, kind="cosine")

    model = tiny_model()
    trainer = make_trainer(tmp_path / "a", model, LoRASCCallback(seed=1),
                           optimizers=own_schedule(model))
    trainer.train()
    cosine = [LR * f for f in (1.0, 0.8535533905932737, 0.5, 0.14644660940672627)] * 2
    assert logged_lrs(trainer) == pytest.approx(cosine)

    ckpt = tmp_path / "a" / "checkpoint-6"
    os.remove(ckpt / STATE_NAME)
    model = tiny_model()
    trainer = make_trainer(tmp_path / "a", model, LoRASCCallback(seed=1),
                           optimizers=own_schedule(model))
    with pytest.raises(FileNotFoundError, match=STATE_NAME):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_load_best_model_at_end_restores_the_best_cascade_state(tmp_path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lorasc_fast import LoRASC

    model = tiny_model()
    callback = LoRASCCallback(seed=2)
    trainer = make_trainer(tmp_path, model, callback, eval_dataset=Tokens(), eval_strategy="steps",
                           eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                           greater_is_better=True)  # the loss falls: "best" = an early checkpoint
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2") and callback.cascade.finished

    rebuilt = tiny_model()  # best checkpoint's adapter + cascade state, then the final merge
    cascade = LoRASC(rebuilt, seed=2, init_noise=False)
    set_peft_model_state_dict(rebuilt, load_file(os.path.join(best, "adapter_model.safetensors")))
    cascade.load_state_dict(torch.load(os.path.join(best, STATE_NAME), weights_only=True))
    cascade.finish()
    expected = rebuilt.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
