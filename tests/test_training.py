"""Training: configs, schedule, the distributed step (1 vs 2 replicas, 2 workers), resume, signals, errors.

Runs that need their own device layout (two logical CPUs, two workers) or a signal
run in subprocesses; the rest run in-process on the tiny preset at 64x64.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from dolg_tf.errors import ConfigError
from dolg_tf.training import run_config, train_config
from dolg_tf.training.config import RunConfig, TrainConfig, parse_value, split_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "training", "train.py")
# Small and fast: tiny preset, 64x64 crops, no held-out evaluation or export.
FAST = ["--image-size", "64", "--batch-size", "8", "--no-export", "--set", "eval_demo=false", "-q"]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="-1",
        TF_CPP_MIN_LOG_LEVEL="3",
        OMP_NUM_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        **extra,
    )
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def _fast_config(tmp_path, name: str, **overrides) -> RunConfig:
    base = dict(
        image_size=64,
        batch_size=8,
        epochs=2,
        steps_per_epoch=2,
        lr=0.01,
        warmup_epochs=1.0,
        export=False,
        eval_demo=False,
        progress=False,
        checkpoint_every=0,
        model_dir=str(tmp_path / name),
    )
    base.update(overrides)
    return run_config("tiny", **base)


# --------------------------------------------------------------------------- config


def test_set_overrides_sections_and_values():
    sections = {"train": ["lr", "seed", "model_dir"], "model": ["gem_p", "dilation_rates"], "data": ["seed", "hue"]}
    out = split_overrides(
        ["lr=0.05", "model.dilation_rates=[1,2,3]", "hue=0.1", "data.seed=3", "model_dir=runs/x"], sections
    )
    assert out == {
        "train": {"lr": 0.05, "model_dir": "runs/x"},
        "model": {"dilation_rates": [1, 2, 3]},
        "data": {"hue": 0.1, "seed": 3},
    }
    assert parse_value("true") is True and parse_value("none") is None and parse_value("1e-4") == 1e-4
    with pytest.raises(ConfigError, match="ambiguous"):
        split_overrides(["seed=1"], sections)
    with pytest.raises(ConfigError, match="no config field") as info:
        split_overrides(["nope=1"], sections)
    assert "did you mean" not in str(info.value)
    # A typo gets the closest names first (difflib), not a list of every field.
    with pytest.raises(ConfigError, match=r"^--set lrr: no config field of that name; did you mean lr\?") as info:
        split_overrides(["lrr=0.1"], sections)
    assert "gem_p" not in str(info.value)
    with pytest.raises(ConfigError, match=r"model has no field 'gem_q'; did you mean model.gem_p\?"):
        split_overrides(["model.gem_q=3"], sections)
    with pytest.raises(ConfigError, match="key=value"):
        split_overrides(["lr"], sections)


def test_train_config_validation_and_presets():
    assert train_config("resnet101").lr == 0.01 and train_config("resnet101").warmup_epochs == 5.0
    paper = train_config("resnet50")
    assert (paper.optimizer, paper.momentum, paper.nesterov, paper.weight_decay) == ("sgd", 0.9, True, 1e-4)
    for bad in (
        {"strategy": "horovod"},
        {"batch_size": 0},
        {"lr": -1.0},
        {"head_margin": 2.0},
        {"image_size": 16},
        {"warmup_epochs": -1.0},
        {"mixed_precision": "fp8"},
    ):
        with pytest.raises(ConfigError):
            train_config("tiny", **bad)
    with pytest.raises(ConfigError, match="unknown TrainConfig"):
        train_config("tiny", learning_rate=0.1)
    cfg = train_config("tiny", lr=0.2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_run_config_resolves_preset_then_overrides_once():
    import dataclasses

    from dolg_tf.config import MODEL_PRESETS
    from dolg_tf.data.config import DataConfig
    from dolg_tf.training.config import TRAIN_PRESETS

    config = run_config(
        "tiny", image_size=80, lr=0.05, seed=3, model_overrides={"gem_p": 4.0}, data_overrides={"min_crop_area": 0.3}
    )
    # The reference: each preset with the overrides applied field by field.
    tiny = TRAIN_PRESETS["tiny"]
    assert config.train == dataclasses.replace(tiny, image_size=80, lr=0.05, seed=3)
    assert config.model == dataclasses.replace(MODEL_PRESETS["tiny"], gem_p=4.0, train_image_size=80)
    assert config.data == dataclasses.replace(DataConfig(), image_size=80, seed=3, min_crop_area=0.3)
    # One frozen object flows down: no section can be changed on the way.
    for target, field in ((config, "train"), (config.train, "lr"), (config.model, "gem_p"), (config.data, "seed")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, field, None)
    # An explicit model override wins over the recorded crop size.
    assert run_config("tiny", model_overrides={"train_image_size": 64}).model.train_image_size == 64
    assert run_config("resnet50").model == dataclasses.replace(MODEL_PRESETS["resnet50"], train_image_size=512)
    with pytest.raises(ConfigError, match="train section"):
        run_config("tiny", data_overrides={"seed": 1})
    with pytest.raises(ConfigError, match="gem_p"):
        run_config("tiny", model_overrides={"gem_p": -1.0})
    with pytest.raises(ConfigError, match="unknown DataConfig"):
        run_config("tiny", data_overrides={"min_crop": 0.3})


def test_command_line_resolves_to_the_same_run_config():
    import argparse

    from dolg_tf.training.cli import PARSER_KWARGS, add_train_arguments, resolve_config

    parser = add_train_arguments(argparse.ArgumentParser(**PARSER_KWARGS))
    args = parser.parse_args(
        [
            "--preset",
            "tiny",
            "--lr",
            "0.2",
            "--image-size",
            "64",
            "--no-export",
            "--set",
            "lr=0.3",
            "--set",
            "model.gem_p=4",
            "--set",
            "min_crop_area=0.5",
        ]
    )
    assert resolve_config(args) == run_config(
        "tiny", lr=0.3, image_size=64, export=False, model_overrides={"gem_p": 4}, data_overrides={"min_crop_area": 0.5}
    )


def test_library_arguments_are_translated_to_flags():
    from dolg_tf.training.cli import in_flag_terms

    assert in_flag_terms(
        "'runs/model_dir' already holds checkpoints: pass resume=True, or choose another model_dir"
    ) == ("'runs/model_dir' already holds checkpoints: pass --resume, or choose another --model-dir")
    assert in_flag_terms("set jit=False or sync_batch_norm=False") == "set --no-jit or --set sync_batch_norm=false"
    assert in_flag_terms("batch_size 6 is not divisible") == "--batch-size 6 is not divisible"
    assert in_flag_terms("end_lr (0.2) must not exceed lr (0.1)") == "end_lr (0.2) must not exceed lr (0.1)"


def test_task_builds_with_its_policy_and_leaves_the_global_one(tmp_path):
    import keras

    from dolg_tf.training.steps import inference_model
    from dolg_tf.training.task import RetrievalTask

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    for mixed_precision, compute in (("bfloat16", "bfloat16"),):
        before = keras.config.dtype_policy().name
        model = RetrievalTask(run_config("tiny", mixed_precision=mixed_precision)).build_model()
        assert keras.config.dtype_policy().name == before == "float32"
        assert model.compute_dtype == compute and model.backbone.get_layer("conv1_conv").compute_dtype == compute
        assert all(v.dtype == "float32" for v in model.weights)
        # The model that is saved and exported: float32 throughout, same weights, its own float32 outputs.
        plain = inference_model(model, model.config)
        assert plain.compute_dtype == "float32" and keras.config.dtype_policy().name == "float32"
        for a, b in zip(model.weights, plain.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        low, full = np.asarray(model(pixels)), np.asarray(plain(pixels))
        assert low.dtype == full.dtype == np.float32
        # 16-bit compute is close to, not equal to, the float32 result.
        np.testing.assert_allclose(low, full, atol=5e-2)
        assert np.abs(low - full).max() > 0


def test_warmup_cosine_schedule_values():
    from dolg_tf.training.optim import WarmupCosine

    schedule = WarmupCosine(0.1, total_steps=20, warmup_steps=5, end_lr=0.001)
    got = np.array([float(schedule(s)) for s in range(25)])
    want = []
    for s in range(25):
        if s < 5:
            want.append(0.1 * (s + 1) / 5)
        else:
            t = min((s - 5) / 15, 1.0)
            want.append(0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * t)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert WarmupCosine.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_weight_decay_skips_batch_norm_bias_and_scalars():
    from dolg_tf.model import build_dolg
    from dolg_tf.training.optim import weight_decay_mask

    model = build_dolg("tiny")
    mask = weight_decay_mask(model.trainable_variables)
    by_path = dict(zip((v.path for v in model.trainable_variables), mask))
    assert any(by_path.values()) and not all(by_path.values())
    for path, decayed in by_path.items():
        name = path.rsplit("/", 1)[-1]
        if name in ("gamma", "beta", "bias", "p"):
            assert not decayed, path
        if name == "kernel":
            assert decayed, path
    assert all(weight_decay_mask(model.trainable_variables, include_norm_and_bias=True))


# --------------------------------------------------------------------------- distribution

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from dolg_tf.training.strategy import make_strategy
    two = make_strategy("mirrored", cpu_replicas=2)   # splits the CPU before TF initialises
    one = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    import numpy as np
    from dolg_tf.training import run_config
    from dolg_tf.training.loop import TrainLoop

    # One BN layer's synchronized moments on two replicas holding half a batch each.
    import keras
    from dolg_tf.training.sync_bn import enable_sync_batch_norm
    with two.scope():
        probe = keras.Sequential([keras.layers.BatchNormalization()])
        probe.build((None, 4, 4, 3))
    probe_layers = enable_sync_batch_norm(probe)
    x = (np.random.default_rng(0).normal(size=(8, 4, 4, 3)) * [1, 2, 3] + [0, 1, -1]).astype("float32")
    halves = two.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[4 * ctx.replica_id_in_sync_group : 4 * (ctx.replica_id_in_sync_group + 1)]))
    moments = tf.function(lambda t: two.run(lambda h: probe.layers[0]._moments(h, None), args=(t,)))(halves)
    out = {"moments": {"layers": probe_layers, "batch": [x.mean((0, 1, 2)).tolist(), x.var((0, 1, 2)).tolist()],
                       "replicas": [[m.numpy().tolist() for m in two.experimental_local_results(part)]
                                    for part in moments]}}
    # Steps per run: three to see the loss fall, two for the first-steps comparison, one for the first loss.
    for name, strategy, sync, steps in (("two", two, True, 3), ("one", one, True, 2), ("two_unsynced", two, False, 1)):
        cfg = run_config("tiny", epochs=1, steps_per_epoch=4, batch_size=16, image_size=64, lr=0.01,
                         sync_batch_norm=sync, export=False, eval_demo=False, progress=False,
                         model_dir=sys.argv[1] + "/" + name)
        loop = TrainLoop(cfg, strategy=strategy)
        state = loop.state
        start = [v.numpy() for v in state.variables]
        step, iterator = loop.make_train_step(), iter(loop.make_dataset())
        losses = []
        for i in range(steps):
            loss, _, _ = step(iterator)
            losses.append(float(loss))
            if i == 0:
                np.savez(sys.argv[1] + f"/{name}_update.npz",
                         *[v.numpy() - s for v, s in zip(state.variables, start)])
                np.savez(sys.argv[1] + f"/{name}_slots.npz", *[v.numpy() for v in state.optimizer.variables])
        out[name] = {"replicas": loop.replicas, "losses": losses, "sync_bn": state.sync_bn_layers}
    print(json.dumps(out))
    """
)


def _max_rel(a_path, b_path) -> float:
    a, b = np.load(a_path), np.load(b_path)
    assert a.files == b.files
    x = np.concatenate([a[k].ravel() for k in a.files]).astype(np.float64)
    y = np.concatenate([b[k].ravel() for k in b.files]).astype(np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


@pytest.mark.integration
def test_mirrored_two_replicas_match_one_replica(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=ROOT),
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = _summary(proc.stdout)
    # Each replica's statistics are the whole batch's (computed here by NumPy), not its half's.
    moments = out["moments"]
    assert moments["layers"] == 1
    for replicas, want in zip(moments["replicas"], moments["batch"]):
        assert len(replicas) == 2
        for got in replicas:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    two, one, unsynced = out["two"], out["one"], out["two_unsynced"]
    assert two["replicas"] == 2 and one["replicas"] == 1
    assert two["sync_bn"] == 18 and one["sync_bn"] == 0 and unsynced["sync_bn"] == 0
    # Learning: the loss falls over a few steps.
    assert two["losses"][-1] < two["losses"][0] - 0.3, two["losses"]
    # Same global batch, same examples, synchronized BN, one all-reduce: the same first step.
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    # Per-replica BN statistics (half the batch each) would change the very first loss.
    assert abs(unsynced["losses"][0] - one["losses"][0]) > 1e-3 * abs(one["losses"][0])
    # The first update (weights and momentum). The gradient of this untrained network is
    # sensitive to summation order: merely reordering one replica's batch moves it by ~1%
    # (ill-conditioned BN channels), so allow 5%; a second all-reduce or a loss averaged per
    # replica would be 100% off.
    assert _max_rel(tmp_path / "one_update.npz", tmp_path / "two_update.npz") < 5e-2
    assert _max_rel(tmp_path / "one_slots.npz", tmp_path / "two_slots.npz") < 5e-2
    # Later steps drift apart as any two float orderings do in this from-scratch network.
    np.testing.assert_allclose(two["losses"][:2], one["losses"][:2], rtol=1e-2)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.integration
def test_multiworker_two_processes_end_with_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        cmd = [
            sys.executable,
            TRAIN_PY,
            "--strategy",
            "multiworker",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--model-dir",
            str(tmp_path / "run"),
            *FAST,
            "--set",
            "progress=false",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(TF_CONFIG=tf_config),
                cwd=str(tmp_path),
            )
        )
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(_summary(stdout))
    assert [o["replicas"] for o in outs] == [2, 2]
    assert [o["step"] for o in outs] == [2, 2]
    assert outs[0]["weights_sha256"] == outs[1]["weights_sha256"]
    # Only the chief keeps checkpoints; the other worker's scratch copy is removed.
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-2")
    assert sorted(os.listdir(tmp_path / "run")) == [
        "checkpoints",
        "config.json",
        "dolg.keras",
        "label_map.json",
        "logs",
    ]


# --------------------------------------------------------------------------- resume, signals, errors


@pytest.mark.integration
def test_resume_continues_step_lr_and_optimizer_slots(tmp_path):
    from dolg_tf.training.loop import TrainLoop
    from dolg_tf.training.steps import train

    whole = TrainLoop(_fast_config(tmp_path, "whole"))
    whole_result = train(whole)
    assert whole_result.step == 4 and whole_result.total_steps == 4

    first = train(TrainLoop(_fast_config(tmp_path, "split", max_steps=2)))
    assert first.step == 2 and first.checkpoint.endswith("ckpt-2")
    saved = tf.train.load_checkpoint(first.checkpoint)

    # The library names its own argument; the command line says --resume (see the flags test).
    with pytest.raises(ConfigError, match="resume=True"):
        TrainLoop(_fast_config(tmp_path, "split"))
    resumed = TrainLoop(_fast_config(tmp_path, "split", resume=True))
    assert resumed.restore() == 2
    assert int(resumed.state.optimizer.iterations.numpy()) == 2
    assert resumed.current_lr() == pytest.approx(float(resumed.state.schedule(2)))
    # The momentum slots are the saved ones, not fresh zeros.
    slot_keys = [k for k in saved.get_variable_to_shape_map() if k.startswith("optimizer/_variables/")]
    slots = {int(k.split("/")[2]): saved.get_tensor(k) for k in slot_keys}
    assert any(np.abs(v).sum() > 0 for v in slots.values() if np.ndim(v))
    for index, value in slots.items():
        np.testing.assert_array_equal(resumed.state.optimizer.variables[index].numpy(), value)

    result = train(resumed)
    assert result.step == 4 and int(resumed.state.optimizer.iterations.numpy()) == 4
    assert result.learning_rate == pytest.approx(whole_result.learning_rate)
    # Same data positions (the input is fast-forwarded), same state: the same weights and slots.
    whole_weights = whole.state.model.weights + whole.state.head.weights
    for a, b in zip(whole_weights, resumed.state.model.weights + resumed.state.head.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    for a, b in zip(whole.state.optimizer.variables, resumed.state.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert set(config) == {"model", "data", "train", "run"}
    assert config["data"]["image_size"] == 64 and config["model"]["backbone"] == "resnet_tiny"
    label_map = json.loads((tmp_path / "split" / "label_map.json").read_text())
    assert config["run"]["num_classes"] == label_map["num_classes"]
    tags = set()
    for event_file in (tmp_path / "split" / "logs" / "train").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags |= {v.tag for v in event.summary.value if v.metadata.plugin_data.plugin_name == "scalars"}
    assert {"loss", "accuracy", "learning_rate", "images_per_second", "skipped_images"} <= tags


@pytest.mark.integration
def test_progress_line_shows_the_epoch_average_the_summary_reports(tmp_path, capsys, caplog):
    from dolg_tf.training.loop import TrainLoop
    from dolg_tf.training.steps import train

    caplog.set_level(logging.INFO, logger="dolg_tf.training")
    config = _fast_config(tmp_path, "progress", epochs=1, steps_per_epoch=3, progress=True, log_every=1)
    result = train(TrainLoop(config))
    line = [text for text in capsys.readouterr().out.splitlines() if "loss:" in text][-1]
    shown_loss = float(re.search(r"loss: ([-+.e0-9]+)", line).group(1))
    shown_acc = float(re.search(r"acc: ([-+.e0-9]+)", line).group(1))
    # The reference: each step's loss and accuracy as TensorBoard recorded them, averaged here.
    steps: dict[str, dict[int, float]] = {"loss": {}, "accuracy": {}}
    for event_file in (tmp_path / "progress" / "logs" / "train").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for v in event.summary.value:
                if v.tag in steps:
                    steps[v.tag][event.step] = float(tf.make_ndarray(v.tensor))
    assert sorted(steps["loss"]) == [1, 2, 3]
    assert shown_loss == pytest.approx(np.mean(list(steps["loss"].values())), abs=1e-4)
    assert result.loss == pytest.approx(np.mean(list(steps["loss"].values())), abs=1e-5)
    assert shown_acc == pytest.approx(np.mean(list(steps["accuracy"].values())), abs=1e-4)
    # The slow steps at the end say what they are doing, and report absolute paths.
    messages = caplog.messages
    model_file = str(tmp_path / "progress" / "dolg.keras")
    assert f"saving the trained model to {model_file} ..." in messages
    assert any(m.startswith(f"saving the trained model to {model_file}: done in ") for m in messages)
    assert result.model_dir == str(tmp_path / "progress") and os.path.isabs(result.checkpoint)


@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    model_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        TRAIN_PY,
        "--epochs",
        "1",
        "--steps-per-epoch",
        "500",
        "--model-dir",
        str(model_dir),
        *FAST,
        "--set",
        "checkpoint_every=2",
        "--set",
        "progress=false",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 180
        while tf.train.latest_checkpoint(str(model_dir / "checkpoints")) is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    summary = _summary(stdout)
    assert summary["interrupted"] == "SIGTERM"
    assert 2 <= summary["step"] < 500
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest.endswith(f"ckpt-{summary['step']}")
    assert int(tf.train.load_variable(latest, "step/.ATTRIBUTES/VARIABLE_VALUE")) == summary["step"]


@pytest.mark.integration
def test_wrong_data_path_fails_before_training(tmp_path):
    model_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, TRAIN_PY, "--data", str(tmp_path / "missing"), "--model-dir", str(model_dir), *FAST],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and "missing" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not model_dir.exists()


def test_dolg_train_and_train_py_share_flags_and_reject_bad_overrides(capsys, tmp_path):
    import argparse

    from dolg_tf.cli import build_parser
    from dolg_tf.training.cli import PARSER_KWARGS, add_train_arguments, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dolg_train = {s for a in sub.choices["train"]._actions for s in a.option_strings}
    train_py = {
        s for a in add_train_arguments(argparse.ArgumentParser(**PARSER_KWARGS))._actions for s in a.option_strings
    }
    assert dolg_train == train_py
    for flag in (
        "--strategy",
        "--preset",
        "--data",
        "--data-format",
        "--image-size",
        "--batch-size",
        "--epochs",
        "--steps-per-epoch",
        "--lr",
        "--optimizer",
        "--head",
        "--mixed-precision",
        "--jit",
        "--model-dir",
        "--resume",
        "--no-resume",
        "--export",
        "--no-export",
        "--set",
    ):
        assert flag in train_py, flag
    for bad, words in (
        (["--set", "learning_rate=1"], "no config field"),
        (["--set", "model.gem_p=-1"], "gem_p"),
        (["--lr", "-0.1"], "lr"),
    ):
        assert main([*bad, "--model-dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train: error:") and words in err[0], err
    assert not (tmp_path / "x").exists()
    # A run directory that holds checkpoints: the command line names its own flags.
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(tmp_path / "used" / "checkpoints" / "ckpt"))
    assert main(["--model-dir", str(tmp_path / "used"), "-q", "--no-export"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --resume" in err[0] and "another --model-dir" in err[0], err


@pytest.mark.integration
def test_float16_dynamic_loss_scaling_skips_overflowing_steps(tmp_path):
    from dolg_tf.training.loop import TrainLoop

    # 32-pixel crops, 4 images a step: float16 arithmetic is emulated on the CPU, so keep the steps small.
    config = _fast_config(
        tmp_path, "fp16", mixed_precision="float16", head="curricularface", image_size=32, batch_size=4
    )
    trainer = TrainLoop(config)
    state = trainer.state
    assert state.model.compute_dtype == "float16" and state.head.compute_dtype == "float32"
    step, iterator = trainer.make_train_step(), iter(trainer.make_dataset())
    applied = []
    for _ in range(8):
        loss, _, norm = step(iterator)
        assert np.isfinite(float(loss))
        applied.append(bool(np.isfinite(float(norm))))
    # 2^15 overflows this network's float16 gradients: those steps are skipped (no optimizer
    # iteration, scale halved) until the scale fits, then updates resume.
    assert not applied[0] and applied[-1]
    assert int(state.optimizer.iterations.numpy()) == sum(applied)
    assert float(state.loss_scale.numpy()) == 32768.0 / 2 ** applied.count(False)
    assert all(np.isfinite(v.numpy()).all() for v in state.model.trainable_variables)


@pytest.mark.integration
def test_corrupt_image_is_skipped_and_counted_by_the_run(tmp_path):
    from PIL import Image

    from dolg_tf.training.loop import TrainLoop
    from dolg_tf.training.steps import train

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.jpg")
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    trainer = TrainLoop(
        _fast_config(
            tmp_path,
            "run",
            data=str(tmp_path / "data"),
            batch_size=4,
            epochs=1,
            steps_per_epoch=3,
            warmup_epochs=0.0,
            eval_demo=True,
        )
    )
    assert trainer.source.num_classes == 2 and trainer.source.num_examples == 9
    result = train(trainer)
    assert result.step == 3 and np.isfinite(result.loss)
    assert result.skipped_images >= 1
    assert result.before is None and result.after is None  # the demo evaluation is for demo data only
