"""Prieto et al. 2025's measures and fixes (stability.py, optim.OrthoAdamW): StableMax against its definition, the
softmax-collapse fraction on logits scaled until float32 rounds them, the NLM cosine, the ⊥Grad projection,
float64 training, the live measures in the progress section, and bad options refused in one line."""

from __future__ import annotations

import math
import os
import sqlite3

import pytest
import torch

from grokking_tracked.cli import main
from grokking_tracked.config import Config, ConfigError, preset
from grokking_tracked.optim import OrthoAdamW, OrthoSGD, make_optimizer, orthogonalize_gradients_
from grokking_tracked.stability import (STABILITY_METRICS, nlm_cosine, softmax_collapse_fraction,
                                        stablemax, training_loss_per_example)
from grokking_tracked.tracking.names import to_mlflow
from grokking_tracked.train import Trainer


def test_stablemax_sums_to_one_and_equals_its_definition():
    z = torch.tensor([[-1.0, 0.0, 2.0], [-3.0, -0.5, 0.25]])
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) below, by hand:
    s = torch.tensor([[1 / 2, 1.0, 3.0], [1 / 4, 1 / 1.5, 1.25]], dtype=torch.float64)
    probs = stablemax(z.double())
    assert torch.allclose(probs, s / s.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)
    loss = training_loss_per_example(z, torch.tensor([2, 0]), "stablemax")
    assert loss.dtype == torch.float64  # computed in float64, as their stablemax_cross_entropy
    assert loss.tolist() == pytest.approx([-math.log(3 / 4.5), -math.log(0.25 / (0.25 + 1 / 1.5 + 1.25))], abs=1e-12)


def test_collapse_fraction_on_logits_scaled_until_float32_rounds_them():
    # Two classes, logits (c, 0): the float32 sum exp(0) + exp(-c) is exactly 1 once exp(-c) <= 2^-24 (half an ulp
    # of 1), i.e. c >= 24 ln 2 = 16.64: scales 17, 20, 40, 100 collapse, 1, 5, 10, 16 do not.
    scales = torch.tensor([1.0, 5.0, 10.0, 16.0, 17.0, 20.0, 40.0, 100.0])
    logits = torch.stack([scales, torch.zeros_like(scales)], dim=-1)
    assert softmax_collapse_fraction(logits).item() == 0.5
    # 112 other classes at -c add up: 112 exp(-c) <= 2^-24 needs c >= 21.4, so 20 no longer collapses.
    wide = torch.cat([scales[:, None], torch.zeros(8, 112)], dim=-1)
    assert softmax_collapse_fraction(wide).item() == 3 / 8
    # Collapsed under a float32 softmax loss (their baseline): the loss is exactly 0 and the correct class's gradient
    # p_y - 1 exactly zero, not small (the other classes keep their tiny p_j).
    collapsed = logits[4:].clone().requires_grad_()
    losses = training_loss_per_example(collapsed, torch.zeros(4, dtype=torch.long), "softmax32")
    losses.sum().backward()
    assert losses.tolist() == [0.0] * 4 and torch.count_nonzero(collapsed.grad[:, 0]) == 0
    # ... while the float64 loss (this project's default) still pulls the correct class up at scales 17 and 20.
    live = logits[4:6].clone().requires_grad_()
    losses = training_loss_per_example(live, torch.zeros(2, dtype=torch.long), "softmax")
    losses.sum().backward()
    assert torch.all(losses > 0) and torch.all(live.grad[:, 0] < 0)


def test_nlm_cosine_when_the_gradient_lies_along_the_weights():
    weights = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([[0.5, 4.0]])]
    assert nlm_cosine(weights, [-2 * w for w in weights]).item() == pytest.approx(1.0, abs=1e-12)  # -g = 2 theta
    assert nlm_cosine(weights, [3 * w for w in weights]).item() == pytest.approx(-1.0, abs=1e-12)
    orthogonal = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([[-8.0, 1.0]])]
    assert nlm_cosine(weights, orthogonal).item() == pytest.approx(0.0, abs=1e-12)
    assert nlm_cosine(weights, [None, None]).item() == 0.0


def test_projection_leaves_no_component_along_the_weights():
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                                       requires_grad=True)]
    raw = [torch.randn_like(p) + 0.7 * p.detach() for p in params]
    for p, g in zip(params, raw):
        p.grad = g.clone()
    expected_cosine = nlm_cosine(params, raw).item()
    cosine = orthogonalize_gradients_(params)
    for p, g in zip(params, raw):
        assert (p.detach() * p.grad).sum().item() == pytest.approx(0.0, abs=1e-12)  # nothing along w, per tensor
        assert p.grad.norm().item() == pytest.approx(g.norm().item(), rel=1e-12)  # rescaled to g's norm
        w = p.detach().flatten()
        by_hand = g.flatten() - (w @ g.flatten()) / (w @ w) * w
        assert torch.allclose(p.grad.flatten(), by_hand * g.norm() / by_hand.norm(), atol=1e-12)
    assert cosine.item() == pytest.approx(expected_cosine, abs=1e-12)  # measured before the projection
    # A step of ⊥AdamW moves along the projected gradient: the same projection happens inside step().
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([-3.0, -4.0], dtype=torch.float64)  # exactly along -w: nothing is left but rounding
    optimizer = OrthoAdamW([p], lr=0.1, weight_decay=0.0)
    optimizer.step()
    assert optimizer.last_nlm_cosine.item() == pytest.approx(1.0, abs=1e-12)
    assert (p.grad @ torch.tensor([3.0, 4.0], dtype=torch.float64)).abs().item() < 1e-12


def test_orthosgd_steps_along_the_projected_gradient():
    """⊥SGD (their Figure 6's last run: SGD, momentum 0.2): one step moves the weights by -lr x the gradient with
    its component along the weights removed and its norm kept, computed here by hand."""
    w0, g = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    projected = g - (w0 @ g) / (w0 @ w0) * w0
    projected = projected * g.norm() / projected.norm()
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    model.weight.grad = g[None].clone()
    optimizer = make_optimizer(model, Config(optimizer="orthosgd", lr=0.5, weight_decay=0.0), torch.device("cpu"))
    assert isinstance(optimizer, OrthoSGD) and optimizer.param_groups[0]["momentum"] == 0.2
    optimizer.step()
    assert torch.allclose(model.weight.detach()[0], w0 - 0.5 * projected, atol=1e-12)
    assert (model.weight.grad[0] @ w0).abs().item() < 1e-12  # the step held no component along the weights
    assert optimizer.last_nlm_cosine.item() == pytest.approx((-(g @ w0) / (g.norm() * w0.norm())).item(), abs=1e-12)
    plain = make_optimizer(model, Config(optimizer="sgd", lr=0.5, weight_decay=0.0), torch.device("cpu"))
    assert type(plain) is torch.optim.SGD


def test_float64_training_runs_in_float64():
    trainer = Trainer(Config(p=11, d_model=16, d_mlp=32, max_steps=3, eval_every=1, dtype="float64"), progress=False)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float64}
    loss = trainer.train_step()
    assert loss.dtype == torch.float64
    assert {p.grad.dtype for p in trainer.model.parameters()} == {torch.float64}
    assert trainer.model(trainer.data.train_tokens[:4], last_only=True).dtype == torch.float64
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("overrides", [dict(loss="stablemax"), dict(optimizer="orthoadamw", weight_decay=0.0,
                                                                   loss="softmax32"),
                                       dict(optimizer="orthosgd", weight_decay=0.0, lr=0.5)])
def test_live_measures_on_the_progress_cadence(overrides):
    config = Config(p=11, d_model=16, d_mlp=32, max_steps=20, eval_every=5, progress_every=10, **overrides)
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    with_measures = [step for step, metrics in result.history if "softmax_collapse" in metrics]
    assert with_measures == [0, 10, 20]
    for step, metrics in result.history:
        if step in with_measures:
            assert 0 <= metrics["softmax_collapse"] <= 1 and -1 <= metrics["nlm_cosine"] <= 1
            assert math.isfinite(metrics["logit_scale"])
    # The collapse and scale read the training pairs of the evaluation's logits: recompute them from the model.
    last = result.history[-1][1]
    with torch.no_grad():
        logits = trainer.model(trainer.data.train_tokens, last_only=True)
    assert last["softmax_collapse"] == pytest.approx(softmax_collapse_fraction(logits).item(), abs=1e-12)
    assert last["logit_scale"] == pytest.approx(logits.amax(-1).double().mean().item(), rel=1e-5)
    if config.optimizer in ("orthoadamw", "orthosgd"):  # the raw gradient's, not the projected one (orthogonal)
        assert last["nlm_cosine"] == trainer.optimizer.last_nlm_cosine.item()
    if config.optimizer == "orthoadamw":  # AdamW's small step: the weights after it are nearly those projected on
        assert abs(last["nlm_cosine"]) > 10 * abs(nlm_cosine(list(trainer.model.parameters())).item())
    assert [to_mlflow(name) for name in STABILITY_METRICS] == [f"progress/{name}" for name in STABILITY_METRICS]


def test_default_loss_is_unchanged():
    """loss = softmax keeps the float64 cross-entropy every earlier run trained with (bit for bit)."""
    logits, labels = torch.randn(7, 5), torch.randint(0, 5, (7,))
    from grokking_tracked.metrics import cross_entropy_high_precision

    trainer = Trainer(Config(p=11, d_model=16, d_mlp=32, max_steps=1), progress=False)
    assert torch.equal(trainer.loss(logits, labels), cross_entropy_high_precision(logits, labels))


@pytest.mark.parametrize("overrides, message", [
    (dict(loss="focal"), "unknown loss 'focal'"), (dict(optimizer="orthograd"), "unknown optimizer 'orthograd'"),
    (dict(optimizer="orthosgd", grokfast_lambda=1.0), "orthosgd cannot be combined with the Grokfast filter"),
    (dict(dtype="float16"), "unknown dtype 'float16'"),
    (dict(optimizer="orthoadamw", grokfast_lambda=2.0), "orthoadamw cannot be combined with the Grokfast filter"),
    (dict(dtype="float64", device="mps"), "dtype float64 is not supported on device mps")])
def test_bad_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config().replace(**overrides)


@pytest.fixture
def clean_environment():
    environment = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.parametrize("args, message", [
    (["--set", "loss=focal"], "unknown loss 'focal'; choose one of softmax, softmax32, stablemax"),
    (["--set", "optimizer=lion"], "unknown optimizer 'lion'"),
    (["--set", "optimizer=orthoadamw", "--grokfast-lambda", "2"], "cannot be combined with the Grokfast filter"),
    (["--set", "dtype=half"], "unknown dtype 'half'")])
def test_cli_refuses_bad_stability_options_in_one_line(tmp_path, capsys, clean_environment, args, message):
    database = tmp_path / "mlflow.db"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *args, "--no-progress", "--tracking-uri", f"sqlite:///{database}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code != 0
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("grokking-tracked: error:"), lines
    if database.exists():  # no run exists: nothing was created before the refusal
        with sqlite3.connect(database) as connection:
            assert connection.execute("select count(*) from runs").fetchone()[0] == 0


def test_prieto2025_preset_smoke():
    """The preset's few first steps train (no long run: its 5,000 steps are for the integrator's measurements)."""
    config = preset("prieto2025", max_steps=3, eval_every=1, progress_every=1, p=23)
    result = Trainer(config, progress=False).train()
    assert result.final_step == 3 and "softmax_collapse" in result.history[-1][1]


def test_stability_figure_is_drawn_only_where_the_measures_were_read(tmp_path):
    from grokking_tracked.figures import save_run_figures

    config = Config(p=11, d_model=16, d_mlp=32, max_steps=20, eval_every=5, progress_every=10)
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    from grokking_tracked.figures import attention_grid

    grid = attention_grid(trainer.model, config.p)
    names = {path.name for path in save_run_figures(tmp_path / "with", result.history, result.events, "", grid)}
    assert names == {"learning_curves.png", "norms.png", "attention.png", "stability.png"}
    assert (tmp_path / "with" / "stability.png").read_bytes()[:4] == b"\x89PNG"
    plain = [(step, {k: v for k, v in m.items() if k not in STABILITY_METRICS}) for step, m in result.history]
    assert "stability.png" not in {p.name for p in save_run_figures(tmp_path / "without", plain, [], "", grid)}
