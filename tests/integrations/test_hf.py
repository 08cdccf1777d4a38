"""The Hugging Face callback under a real transformers Trainer on the CPU, with a tiny BERT built from its config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import probekit as pk
from probekit.integrations.hf import ProbeCallback

ROOT = Path(__file__).resolve().parents[2]
#: torch.fx cannot trace BERT; the engine says so and probes it with forward hooks.
pytestmark = pytest.mark.filterwarnings("ignore:BertForSequenceClassification cannot be traced:UserWarning")
VOCAB, TOKENS = 24, 8


def _tokens(n: int, seed: int):
    """Random token sequences (a CLS-like id 1 first, padding at the end); the label is whether token 2 holds an even id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, TOKENS), generator=g)
    ids[:, 0] = 1
    lengths = torch.randint(4, TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}, (ids[:, 2] % 2).long()


@pytest.fixture(scope="module")
def splits():
    return {"train": _tokens(160, 0), "valid": _tokens(80, 1)}


def _rows(split):
    inputs, labels = split
    return [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": labels[i]}
            for i in range(len(labels))]


def _model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=TOKENS, num_labels=2)
    return BertForSequenceClassification(config)


class _Recorder(TrainerCallback):
    """Every ``on_log`` call's logs, as a ``report_to`` logger (TensorBoard, W&B) receives them."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _train(tmp_path, splits, callbacks, model=None, epochs=2, resume_from_checkpoint=None, **options):
    options = {"logging_strategy": "epoch", "eval_strategy": "epoch", "save_strategy": "no", **options}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], num_train_epochs=epochs,
                             per_device_train_batch_size=32, per_device_eval_batch_size=80, learning_rate=5e-3,
                             seed=0, disable_tqdm=True, **options)
    model = model if model is not None else _model()
    trainer = Trainer(model=model, args=args, train_dataset=_rows(splits["train"]), eval_dataset=_rows(splits["valid"]),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, model


@pytest.mark.slow
def test_a_trainer_run_writes_epochs_0_to_2_with_the_logged_losses_and_logs_the_best_layer(splits, tmp_path):
    callback, recorder = ProbeCallback(splits, store=tmp_path / "bert.zarr", reduce="first", quiet=True), _Recorder()
    trainer, _ = _train(tmp_path, splits, [recorder, callback])  # a callback before it, as report_to loggers are

    ds = pk.open_run(tmp_path / "bert.zarr")
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 5, 10]
    assert ds.layer.values.tolist() == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
                                        "classifier"]
    history = trainer.state.log_history
    logged_train = [entry["loss"] for entry in history if "loss" in entry]
    logged_valid = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(logged_train) == len(logged_valid) == 2
    assert np.isnan(ds.model_loss.values[0])
    np.testing.assert_allclose(ds.model_loss.values[1:], logged_train, rtol=1e-6)
    assert np.isnan(ds.model_valid_loss.values[0])
    np.testing.assert_allclose(ds.model_valid_loss.values[1:], logged_valid, rtol=1e-6)
    losses = callback.model_losses
    np.testing.assert_allclose(losses.sel(split="valid").values[1:], logged_valid, rtol=1e-6)
    best = [entry for entry in history if "probe_best_valid_error" in entry]  # once per row
    assert [(e["epoch"], e["step"]) for e in best] == [(0.0, 0), (1.0, 5), (2.0, 10)]
    np.testing.assert_allclose([e["probe_best_valid_error"] for e in best],
                               ds.probe.sel(metric="valid_error").min("layer").values, rtol=1e-6)
    heard = [logs for logs in recorder.logs if "probe_best_valid_error" in logs]  # through the Trainer's on_log
    assert heard == [{k: v for k, v in e.items() if k != "step"} for e in best]


@pytest.mark.slow
def test_a_step_row_written_at_an_epochs_end_leaves_the_trainers_own_log_of_that_epoch(splits, tmp_path):
    """Rows every 5 steps of 5-step epochs are written at on_epoch_end, after the Trainer asked to log the epoch:
    logging the best layer's error through on_log must not cancel that."""
    callback, recorder = ProbeCallback(splits, every_n_steps=5, reduce="first", quiet=True), _Recorder()
    trainer, _ = _train(tmp_path, splits, [callback, recorder])
    assert callback.dataset.step.values.tolist() == [0, 5, 10]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [5, 10]
    assert [e["step"] for e in trainer.state.log_history if "probe_best_valid_error" in e] == [0, 5, 10]
    assert len([logs for logs in recorder.logs if "probe_best_valid_error" in logs]) == 3


@pytest.mark.slow
def test_the_model_trains_exactly_as_it_would_without_the_callback(splits, tmp_path):
    """BERT's dropout draws from torch's random stream while it trains, and so does the probes' shuffling loader:
    probing must leave that stream as it was."""
    inputs, labels = splits["train"]
    shuffled = DataLoader([({k: v[i] for k, v in inputs.items()}, labels[i]) for i in range(len(labels))],
                          batch_size=64, shuffle=True)
    callback = ProbeCallback({"train": shuffled, "valid": splits["valid"]}, reduce="mean", quiet=True)
    _, with_probes = _train(tmp_path, splits, [callback])
    _, without = _train(tmp_path, splits, [])
    assert callback.dataset.sizes["epoch"] == 3
    for (name, a), (_, b) in zip(with_probes.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name
    assert [m.training for m in with_probes.modules()] == [m.training for m in without.modules()]


@pytest.mark.slow
def test_online_mode_steps_the_probes_every_batch_and_writes_every_n_steps(splits, tmp_path):
    callback = ProbeCallback(splits, mode="online", every_n_steps=4, reduce="first", probe_lr=1e-2, quiet=True)
    trainer, model = _train(tmp_path, splits, [callback], epochs=2, logging_strategy="steps", logging_steps=4)
    ds = callback.dataset
    assert ds.attrs["mode"] == "online"
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 4, 8]
    assert (ds.iterations.values[:, -1] == 8).all()  # one probe step per training batch
    logged = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    np.testing.assert_allclose(ds.model_loss.values[1:], [logged[4], logged[8]], rtol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_data_that_does_not_fit_the_model_stops_training_before_any_step(splits, tmp_path):
    inputs, labels = splits["train"]
    wrong = {"train": ({**inputs, "input_ids": inputs["input_ids"] + VOCAB}, labels), "valid": splits["valid"]}
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the callback's train split does not fit BertForSequenceClassification: .*"
                                         r"IndexError: index out of range"):
        _train(tmp_path, splits, [ProbeCallback(wrong, quiet=True)], model=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_training_resumed_from_a_checkpoint_continues_the_rows_of_its_store(splits, tmp_path):
    store = tmp_path / "r.zarr"
    _train(tmp_path, splits, [ProbeCallback(splits, store=store, reduce="first", quiet=True)], epochs=1,
           save_strategy="epoch")
    checkpoint = str(tmp_path / "out" / "checkpoint-5")
    callback = ProbeCallback(splits, store=store, reduce="first", resume=True, quiet=True)
    _train(tmp_path, splits, [callback], epochs=2, resume_from_checkpoint=checkpoint)
    ds = pk.open_run(store)
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 5, 10]
    assert np.isfinite(ds.model_loss.values[1:]).all()
    with pytest.raises(ValueError, match=r"^the trainer resumes from a checkpoint at step 5, and the run \(kept in memory"):
        _train(tmp_path, splits, [ProbeCallback(splits, quiet=True)], epochs=2, resume_from_checkpoint=checkpoint)


@pytest.mark.slow
def test_an_epoch_cut_short_by_max_steps_gets_no_row(splits, tmp_path):
    callback = ProbeCallback(splits, reduce="first", quiet=True)
    _train(tmp_path, splits, [callback], max_steps=7)  # 5 steps an epoch
    assert callback.dataset.epoch.values.tolist() == [0, 1]


def test_without_transformers_the_import_names_the_extra_in_one_line():
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['transformers'] = None\n"
                             "import probekit.integrations.hf"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: probekit.integrations.hf needs transformers (and accelerate, for its Trainer), which are not "
        'installed; pip install "probekit[hf]"')
