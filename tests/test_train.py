"""One trial trains, evaluates, detects divergence and is reproducible."""

import contextlib
import dataclasses
import math

import pytest
import torch

from ablate.config import ConfigError, RunConfig, from_dict, load_run_config
from ablate.logger import RecordingLogger
from ablate.responses import CUDA_ONLY, DIAGNOSTICS, RESPONSES
from ablate.train import _auto_loss, lr_at, main, param_groups, train
from ablate.train_config import OptimConfig, TrainConfig
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def tiny_run(cache_dir: str, **sections) -> RunConfig:
    tree = {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
        "data": {
            "source": "stories",
            "tokenizer": "bpe:300",
            "corpus_docs": 200,
            "val_tokens": 2048,
            "cache_dir": cache_dir,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"tokens": 16 * 32 * 30, "batch_size": 16, "eval_every": 10, "log_every": 5, "threads": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return from_dict(RunConfig, tree)


def test_lr_schedule_is_warmup_then_cosine():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 110, optim) == pytest.approx(0.1)
    assert lr_at(9, 110, optim) == pytest.approx(1.0)
    assert lr_at(60, 110, optim) == pytest.approx(0.55)
    assert lr_at(110, 110, optim) == pytest.approx(0.1)


def test_weight_decay_groups():
    model = GPT(
        GPTConfig(vocab_size=50, n_layers=1, d_model=16, n_heads=2, context=8, registers=1, position="susie")
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith("bias") or "ln" in n or "registers" in n or "position" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_falls_and_metrics_reported(cache_dir):
    log = RecordingLogger()
    result = train(tiny_run(cache_dir), log)
    assert result.status == "finished" and result.diverged_step is None
    losses = [v for _, v in log.series("train/loss")]
    val = [v for _, v in log.series("val/loss")]
    assert losses[-1] < losses[0] - 0.5
    assert len(val) == 3 and val[-1] < val[0]  # evaluations at steps 10, 20 and the end
    assert result.val_loss == pytest.approx(val[-1])
    for key in (
        "lr",
        "grad_norm",
        "tokens_per_s",
        "gamma/mean",
        "diag/key_norm_mean/layer0",
        "diag/attn_entropy/mean",
    ):
        assert any(key in m for _, m in log.history), key
    assert log.params["model.metric"] == "sdpa" and log.params["derived.total_steps"] == 30
    assert log.params["derived.loss"] == "plain"  # loss: auto is the plain loss on CPU
    time = {k.removeprefix("time/"): v for k, v in result.summary.items() if k.startswith("time/")}
    assert set(time) == {"setup_s", "first_window_s", "train_s", "eval_s", "log_s", "step1_s", "steps1_3_s"}
    assert all(v >= 0 for v in time.values()) and time["train_s"] > 0 and time["eval_s"] > 0
    assert time["first_window_s"] <= time["train_s"]
    # the first window's parts: step 1, then steps 1-3, both inside it
    assert 0 < time["step1_s"] <= time["steps1_3_s"] <= time["first_window_s"]
    # tokens/s counts training time only: evaluation inside a window is taken out of it
    windows = [v for _, v in log.series("tokens_per_s")]
    assert min(windows) > 0 and result.summary["tokens_per_s"] == pytest.approx(sorted(windows[1:])[2])


def test_same_config_and_seed_give_bit_identical_losses(cache_dir):
    runs = []
    for _ in range(2):
        log = RecordingLogger()
        train(tiny_run(cache_dir, model={"metric": "rbf", "position": "susie", "registers": 1}), log)
        runs.append([v for _, m in log.history for k, v in sorted(m.items()) if "loss" in k])
    assert runs[0] == runs[1]


def test_a_tiny_cpu_trial_reports_every_declared_response(cache_dir):
    """Every response a study may name (ablate.responses) is produced by train() under that name."""
    result = train(tiny_run(cache_dir, model={"metric": "rbf", "registers": 1}))
    produced = {name for name, value in result.summary.items() if math.isfinite(value)}
    assert set(RESPONSES) - set(CUDA_ONLY) <= produced, set(RESPONSES) - produced
    assert result.summary["val_loss"] == result.val_loss
    assert set(DIAGNOSTICS) <= set(RESPONSES)


def test_the_model_says_which_temperatures_are_learned(cache_dir):
    cases = {  # (gamma_schedule, lam_schedule) -> learned
        ("constant", "tied"): set(),
        ("learnable", "tied"): {"gamma", "lam"},
        ("warmup", "learnable"): {"lam"},
        ("learnable", "constant"): {"gamma"},
    }
    for (gamma, lam), learned in cases.items():
        cfg = GPTConfig(n_layers=1, d_model=32, n_heads=2, context=16, vocab_size=64, metric="penalty")
        model = GPT(dataclasses.replace(cfg, gamma_schedule=gamma, lam_schedule=lam))
        assert model.learned_temperatures() == learned, (gamma, lam)


def test_learnable_gamma_is_reported_per_head(cache_dir):
    log = RecordingLogger()
    train(
        tiny_run(
            cache_dir, model={"metric": "penalty", "gamma_schedule": "learnable", "lam_schedule": "learnable"}
        ),
        log,
    )
    last = log.series("gamma/layer0/head1")
    assert last and math.isfinite(last[-1][1])
    assert log.series("lam/layer0/head0")


def test_a_window_reads_the_device_once(cache_dir, monkeypatch):
    """Each read of a tensor's values waits for the GPU (and, with other trials on it, for their kernels
    too): a logging window reads its losses, gradient norm and temperatures in one transfer."""
    import inspect

    import ablate.train as train_module

    reads, real_tolist, real_item = [], torch.Tensor.tolist, torch.Tensor.item

    def counted(real):
        def read(tensor):
            caller = inspect.stack(context=0)[1]
            if caller.filename == train_module.__file__ and caller.function in ("_train", "read"):
                reads.append(caller.function)
            return real(tensor)

        return read

    monkeypatch.setattr(torch.Tensor, "tolist", counted(real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    log = RecordingLogger()
    model = {"metric": "penalty", "gamma_schedule": "learnable", "lam_schedule": "learnable"}
    assert train(tiny_run(cache_dir, model=model), log).status == "finished"
    windows = log.series("train/loss")
    assert len(windows) == 6 and reads == ["read"] * len(windows)
    for _, metrics in log.history:  # the per-head values and their mean, from that one transfer
        if "gamma/layer0/head1" in metrics:
            for name in ("gamma", "lam"):
                heads = [metrics[f"{name}/layer0/head{h}"] for h in range(2)]
                assert metrics[f"{name}/mean"] == pytest.approx(sum(heads) / 2)


def test_temperature_metrics_name_each_layer_and_head():
    from ablate.train import _temperature_metrics

    temperatures = {"gamma": torch.empty(2, 3), "lam": torch.empty(2, 3)}  # 2 layers x 3 heads
    values = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5] * 6]  # as read from the device, layer-major
    out = _temperature_metrics(temperatures, values, {"gamma"})
    assert out["gamma/mean"] == 3.5 and out["lam/mean"] == 0.5
    assert out["gamma/layer1/head0"] == 4.0 and out["gamma/layer0/head2"] == 3.0
    assert not any(k.startswith("lam/layer") for k in out)  # lambda is not learned here


def test_exploding_configuration_is_reported_as_diverged(cache_dir):
    cfg = tiny_run(cache_dir, optim={"lr": 50.0, "warmup_steps": 0, "grad_clip": None})
    result = train(cfg)
    assert result.status == "diverged"
    assert result.diverged_step is not None and 0 <= result.diverged_step < 30


def test_injected_nan_is_diverged_at_its_step(cache_dir):
    result = train(tiny_run(cache_dir, train={"fault": "nan@7"}))
    assert result.status == "diverged" and result.diverged_step == 7 and result.steps == 7


def test_injected_failure_raises(cache_dir):
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        train(tiny_run(cache_dir, train={"fault": "raise@3"}))


def test_unknown_key_and_bad_type_are_named():
    with pytest.raises(ConfigError, match=r"model\.metrik: unknown key; valid keys here: .*metric"):
        from_dict(RunConfig, {"model": {"metrik": "rbf"}})
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int"):
        from_dict(RunConfig, {"train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match=r"model\.metric: metric='dot'"):
        from_dict(RunConfig, {"model": {"metric": "dot"}})
    with pytest.raises(ConfigError, match=r"train\.loss: loss='fast'"):
        from_dict(RunConfig, {"train": {"loss": "fast"}})
    with pytest.raises(ConfigError, match="cuda_graphs needs compile"):
        from_dict(RunConfig, {"train": {"cuda_graphs": True}})


def test_overrides_beat_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  metric: sdpa\n  n_layers: 2\n")
    cfg = load_run_config(path, ["model.metric=rbf", "optim.lr=1e-4"])
    assert cfg.model.metric == "rbf" and cfg.model.n_layers == 2 and cfg.optim.lr == 1e-4


def test_train_command_rejects_unknown_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  metric: sdpa\ntrain:\n  budget: 10\n")
    assert main(path, []) == 2
    err = capsys.readouterr().err
    assert "train.budget" in err and "unknown key" in err and str(path) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("loss: fused", "train.loss"),
        ("loss: fused-persistent", "train.loss"),
        ("device: cuda", "train.device"),
        ("compile: true\n  cuda_graphs: true", "train.cuda_graphs"),
    ],
)
def test_train_command_refuses_gpu_settings_without_a_gpu(tmp_path, capsys, setting, key):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model:\n  n_layers: 1\ndata:\n  source: 'random:64'\ntrain:\n  device: cpu\n  {setting}\n"
    )
    if key == "train.device":
        path.write_text(f"train:\n  {setting}\n")
    assert main(path, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("device", "settings", "expected"),
    [
        ("cpu", {}, "plain"),
        ("cpu", {"compile": True}, "plain"),
        ("cuda", {}, "fused"),  # eager: fused measured faster (928k against 577k tokens/s)
        ("cuda", {"compile": True}, "plain"),  # compiled, CPU-bound: plain as fast or faster
        (
            "cuda",
            {"compile": True, "cuda_graphs": True},
            "fused",
        ),  # 2.38-2.40M against 1.64M (plain + graphs)
    ],
)
def test_auto_loss_is_the_measured_fastest_path(device, settings, expected):
    assert _auto_loss(torch.device(device), TrainConfig(**settings)) == expected


def test_evaluation_reads_the_device_once_and_gives_the_token_weighted_loss(cache_dir, monkeypatch):
    """Each read of a GPU value waits for the GPU, which a study's other trials keep busy: evaluation
    keeps its losses and diagnostics on the device and reads them together, with the values that reading
    each batch's loss and each statistic on its own gives."""
    from ablate.data import prepare, val_batches
    from ablate.train import evaluate
    from model.diagnostics import summarize_layer

    cfg = tiny_run(cache_dir, model={"metric": "rbf", "registers": 1}, train={"batch_size": 3})
    data = prepare(cfg.data, cfg.model.context)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    batches = list(val_batches(data, 3, device=torch.device("cpu")))
    assert len({y.numel() for _, y in batches}) > 1  # a short last batch: the weights matter
    with torch.no_grad():
        expected = sum(model(x, y).item() * y.numel() for x, y in batches) / sum(
            y.numel() for _, y in batches
        )
        captures = [{} for _ in model.blocks]
        for block, cap in zip(model.blocks, captures, strict=True):
            block.attn.capture = cap
        model.hidden(batches[0][0][: cfg.train.diagnostics_batch])
        for block in model.blocks:
            block.attn.capture = None
        layer0 = {
            k: v.item() for k, v in summarize_layer(captures[0]["keys"], captures[0]["probs"], 1).items()
        }

    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, _real=real, _name=name: reads.append(_name) or _real(self)
        )
    got = evaluate(model, data, cfg, torch.device("cpu"), contextlib.nullcontext())
    monkeypatch.undo()
    assert reads == ["tolist"]
    assert got["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert {k.removeprefix("diag/").removesuffix("/layer0") for k in got if k.endswith("/layer0")} == set(
        layer0
    )
    for name, value in layer0.items():
        assert got[f"diag/{name}/layer0"] == pytest.approx(value, rel=1e-6)
