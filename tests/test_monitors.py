"The training monitors (lora_nb.monitors, nbs/07_monitors.ipynb): findings, the TrainingMonitor callback, log-history rules, TensorBoard read-back."
import math

import pytest
import torch

from lora_nb.monitors import (Finding, LossPlateauWarning, TrainingDiverged, TrainingMonitor, check_log_history,
                              find_overfitting, has_errors, history_from_scalars, loss_plateau, read_scalars)


def checks(findings): return sorted(f.check for f in findings)


def test_finding_severities():
    fs = [Finding('info', 'a', 'b', 'c'), Finding('warning', 'a', 'b', 'c')]
    assert not has_errors(fs) and has_errors(fs + [Finding('error', 'a', 'b', 'c')])
    with pytest.raises(ValueError, match='use one of error, warning, info'): Finding('fatal', 'a', 'b', 'c')


def test_log_history_checks():
    falling = [{'step': s, 'loss': 2.0 * 0.99 ** s} for s in range(1, 101)]
    evals = [{'step': s, 'eval_loss': 1.0 + 1e-5 * (s - 40) ** 2} for s in range(20, 101, 20)]
    o = find_overfitting(falling + evals)
    assert o['step'] == 40 and o['last_train_loss'] < o['train_loss_at_best']
    assert checks(check_log_history(falling + evals)) == ['overfitting']
    flat = [{'step': s, 'loss': 2.5} for s in range(1, 30)]
    assert checks(check_log_history(flat)) == ['loss-plateau']
    assert loss_plateau([(s, 2.5) for s in range(1, 10)]) is None  # not enough steps to tell
    assert checks(check_log_history([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': math.nan}])) == ['nan-loss']
    rising_train = [{'step': s, 'loss': 1.0 + s / 100} for s in range(1, 101)]
    assert find_overfitting(rising_train + evals) is None  # both rising: not overfitting


def test_monitor_stops_on_nan_and_warns_on_plateau():
    from transformers import TrainerControl, TrainerState, TrainingArguments
    args, control, mon = TrainingArguments(output_dir='/tmp/unused', report_to='none', use_cpu=True), TrainerControl(), TrainingMonitor(plateau_steps=10)
    state = TrainerState()
    with pytest.warns(LossPlateauWarning, match='loss has stayed at'):
        for step in range(1, 12):
            state.global_step = step
            mon.on_log(args, state, control, logs={'loss': 2.5, 'learning_rate': 1e-4, 'grad_norm': 1.0})
    assert [f.check for f in mon.findings] == ['loss-plateau'] and len(mon.history) == 11
    state.global_step = 12
    with pytest.raises(TrainingDiverged, match='step 12: the loss is inf'):
        mon.on_log(args, state, control, logs={'loss': math.inf})


def test_tensorboard_round_trip(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path/'tb'))
    for s in range(1, 6): w.add_scalar('train/loss', 3.0 - 0.1 * s, s)
    w.add_scalar('eval/loss', 2.9, 5); w.close()
    hist = history_from_scalars(read_scalars(tmp_path))
    assert [h['step'] for h in hist if 'loss' in h] == [1, 2, 3, 4, 5]
    assert [(h['step'], round(h['eval_loss'], 4)) for h in hist if 'eval_loss' in h] == [(5, 2.9)]


def test_monitor_splits_gradients_and_stops_on_a_nan_gradient(tmp_path):
    "The hooks a Trainer calls, called by hand: split norms add up, the update ratio is measured, a NaN gradient stops"
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments
    from lora_nb.models import attach_lora, tiny_config
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(tiny_config(vocab_size=128)), target_modules='q_proj,down_proj')
    params = [p for p in model.parameters() if p.requires_grad]
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to='none', use_cpu=True), TrainerState(), TrainerControl()
    mon = TrainingMonitor(log_dir=tmp_path/'tb')
    for p in params: p.grad = torch.randn_like(p)
    total = float(torch.nn.utils.clip_grad_norm_(params, 1e9))
    mon.on_pre_optimizer_step(args, state, control, model=model)
    with torch.no_grad():
        for p in params: p -= 0.1 * p.grad
    mon.on_optimizer_step(args, state, control, model=model)
    state.global_step = 1
    mon.on_log(args, state, control, logs={'loss': 2.0, 'learning_rate': 0.1, 'grad_norm': total})
    h = mon.history[-1]
    q = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad and '.q_proj.' in n]).norm()
    assert h['grad_norm_attention'] == pytest.approx(float(q), rel=1e-5)
    assert h['grad_norm_attention'] ** 2 + h['grad_norm_mlp'] ** 2 == pytest.approx(total ** 2, rel=1e-5)
    assert 0 < h['update_ratio_attention'] and 0 < h['update_ratio_mlp']
    params[0].grad[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match='step 2: the gradient norm is nan'):
        mon.on_pre_optimizer_step(args, state, control, model=model)
    mon.on_train_end(args, state, control)
    assert [s for s, _ in read_scalars(tmp_path)['monitor/grad_norm_mlp']] == [1]
