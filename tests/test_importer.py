"""Runs trained elsewhere: the earlier project's run folders and HookedTransformer state dicts, built here in
their own format (TransformerLens names, zero biases, its config.json), imported as our config and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grokking_tracked.analysis import analyze_checkpoints
from grokking_tracked.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from grokking_tracked.analysis.importer import ForeignRunError, load_foreign_run
from grokking_tracked.config import preset
from grokking_tracked.data import make_dataset
from grokking_tracked.model import GrokkingTransformer

P, D_MODEL, N_HEADS, D_MLP = 23, 32, 4, 64


def earlier_config(**model_overrides) -> dict:
    """config.json as the earlier project wrote it (its keys, its nesting)."""
    return {"p": P, "frac_train": 0.3, "lr": 0.001, "wd": 1.0, "betas": [0.9, 0.98], "num_epochs": 25000,
            "checkpoint_every": 5000, "weight_track_every": 5000, "batch_size": 2048, "data_seed": 598,
            "model_seed": 999, "device": "cpu",
            "model_config": {"n_layers": 1, "n_heads": N_HEADS, "d_model": D_MODEL, "d_head": D_MODEL // N_HEADS,
                             "d_mlp": D_MLP, "act_fn": "relu", "normalization_type": None, **model_overrides}}


def hooked_transformer_state(seed: int) -> dict[str, torch.Tensor]:
    """A HookedTransformer (TransformerLens 3.x) state dict of the grokking shape: our weights under the same names,
    plus the attention/unembedding biases (frozen at zero by the earlier project) and the attention buffers."""
    model = GrokkingTransformer(preset("default", p=P, d_model=D_MODEL, n_heads=N_HEADS, d_mlp=D_MLP, seed=seed))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d_head = D_MODEL // N_HEADS
    state.update({"blocks.0.attn.b_Q": torch.zeros(N_HEADS, d_head), "blocks.0.attn.b_K": torch.zeros(N_HEADS, d_head),
                  "blocks.0.attn.b_V": torch.zeros(N_HEADS, d_head), "blocks.0.attn.b_O": torch.zeros(D_MODEL),
                  "blocks.0.attn.mask": torch.tril(torch.ones(3, 3, dtype=torch.bool)),
                  "blocks.0.attn.IGNORE": torch.tensor(-torch.inf), "unembed.b_U": torch.zeros(P)})
    return state


def earlier_checkpoint(epoch: int, seed: int, **extra) -> dict:
    state = hooked_transformer_state(seed)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(v.float()) for k, v in state.items() if "W_" in k])
    return {"epoch": epoch, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
            "train_loss": 0.5 / (epoch + 1), "test_loss": 4.0 - epoch / 10_000, "config": earlier_config(), **extra}


def write_earlier_run(folder: Path, epochs=(0, 5000, 10000)) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(earlier_config(), indent=4))
    for i, epoch in enumerate(epochs):
        torch.save(earlier_checkpoint(epoch, seed=i), folder / "checkpoints" / f"checkpoint_epoch_{epoch}.pt")
    return folder


def test_earlier_project_folder_round_trips_into_our_config_and_checkpoints(tmp_path):
    run = load_foreign_run(write_earlier_run(tmp_path / "grokking_20241222_222024"))
    assert run.kind == "earlier-project" and run.source == str((tmp_path / "grokking_20241222_222024").resolve())
    c = run.config
    assert (c.p, c.d_model, c.n_heads, c.d_mlp, c.n_layers, c.normalization) == (P, D_MODEL, N_HEADS, D_MLP, 1, "none")
    assert (c.lr, c.weight_decay, c.beta1, c.beta2, c.max_steps, c.seed) == (1e-3, 1.0, 0.9, 0.98, 25000, 999)
    # checkpoint_epoch_N was saved after epoch N's optimizer step: N + 1 steps
    assert [step for step, _ in run.checkpoints] == [1, 5001, 10001]
    assert run.history == [(1, {"train_loss": 0.5, "test_loss": 4.0}), (5001, {"train_loss": 0.5 / 5001,
                                                                               "test_loss": 3.5}),
                           (10001, {"train_loss": 0.5 / 10001, "test_loss": 3.0})]
    # the weights are the source's, under our names; dropped: zero biases we lack and the attention buffers
    for i, (step, state) in enumerate(run.checkpoints):
        source = hooked_transformer_state(seed=i)
        model = model_from_checkpoint(state, c)
        assert set(model.state_dict()) == set(state["model"]) == {k for k in source if not (
            k.endswith(("b_Q", "b_K", "b_V", "b_O", "b_U", "mask", "IGNORE")))}
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, source[name]), name
        assert state["step"] == step and state["config"] == c.to_dict()

    # The earlier project split with torch.randperm(p*p) after torch.manual_seed(model_seed), keeping
    # int(p*p*frac) pairs, in the same (a, b) order as ours: the imported config reproduces that split exactly.
    torch.manual_seed(999)
    order = torch.randperm(P * P)
    theirs = order[: int(P * P * 0.3)]
    ours = make_dataset(c).train_tokens
    assert torch.equal(ours[:, 0] * P + ours[:, 1], theirs)


def test_imported_run_is_analysed_like_ours(tmp_path):
    run = load_foreign_run(write_earlier_run(tmp_path / "run", epochs=(0, 5000)))
    paths = []
    for step, state in run.checkpoints:
        paths.append((step, tmp_path / f"step_{step:07d}.pt"))
        torch.save(state, paths[-1][1])
    assert load_checkpoint(paths[0][1])["model"].keys() == run.checkpoints[0][1]["model"].keys()  # weights_only-safe
    summary = analyze_checkpoints(paths, tmp_path / "analysis", history=run.history, progress=False)
    assert summary["steps"] == [1, 5001] and summary["p"] == P


def test_hooked_transformer_state_dict_file(tmp_path):
    torch.save(hooked_transformer_state(seed=3), tmp_path / "model_step_14000.pt")
    run = load_foreign_run(tmp_path / "model_step_14000.pt", operation="sub")
    assert run.kind == "hooked-transformer"
    assert [step for step, _ in run.checkpoints] == [14000]
    assert (run.config.p, run.config.operation, run.config.d_mlp) == (P, "sub", D_MLP)
    assert len(make_dataset(run.config).train_tokens) == int(P * P * 0.3)  # the TransformerLens demo's split size
    # a single checkpoint file of the earlier project is read too
    torch.save(earlier_checkpoint(7, seed=0), tmp_path / "checkpoint_epoch_7.pt")
    single = load_foreign_run(tmp_path / "checkpoint_epoch_7.pt")
    assert single.kind == "earlier-project" and [s for s, _ in single.checkpoints] == [8]


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    folder = write_earlier_run(tmp_path / "run", epochs=(0,))
    marker = tmp_path / "pwned"
    torch.save(earlier_checkpoint(5000, seed=1, test_loss=Payload(marker)),
               folder / "checkpoints" / "checkpoint_epoch_5000.pt")
    with pytest.raises(CheckpointError, match="unsafe loading") as error:
        load_foreign_run(folder)
    assert "\n" not in str(error.value) and not marker.exists()
    state = hooked_transformer_state(seed=0)
    state["embed.W_E"] = Payload(marker)
    torch.save(state, tmp_path / "planted.pt")
    with pytest.raises(CheckpointError, match="unsafe loading"):
        load_foreign_run(tmp_path / "planted.pt")
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"blocks.0.attn.b_Q": torch.full((N_HEADS, D_MODEL // N_HEADS), 0.1)}),
     "blocks.0.attn.b_Q is not zero"),
    (lambda s: s.update({"unembed.b_U": torch.ones(P)}), "unembed.b_U is not zero"),
    (lambda s: s.update({"blocks.0.mlp.W_in": torch.zeros(D_MODEL, D_MLP + 1)}), "another model shape"),
    (lambda s: s.update({"unembed.W_U": torch.zeros(D_MODEL, P + 2)}), "another shape"),
    (lambda s: s.update({"blocks.0.attn.rotary_sin": torch.zeros(3, 4)}), "does not match"),
    (lambda s: s.update({"note": "hello"}), "note is a str, not a tensor"),
    (lambda s: s.pop("embed.W_E"), "neither an earlier-project run nor"),
])
def test_state_dict_of_another_shape_or_kind_is_refused_in_one_line(tmp_path, change, message):
    state = hooked_transformer_state(seed=0)
    change(state)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ForeignRunError, match=message) as error:
        load_foreign_run(tmp_path / "model.pt")
    assert "\n" not in str(error.value)


def test_non_tensor_weights_in_an_earlier_checkpoint_are_refused(tmp_path):
    folder = write_earlier_run(tmp_path / "run", epochs=(0,))
    checkpoint = earlier_checkpoint(5000, seed=1)
    checkpoint["model_state_dict"]["embed.W_E"] = checkpoint["model_state_dict"]["embed.W_E"].tolist()
    torch.save(checkpoint, folder / "checkpoints" / "checkpoint_epoch_5000.pt")  # plain containers: loads safely
    with pytest.raises(ForeignRunError, match="embed.W_E is a list, not a tensor"):
        load_foreign_run(folder)


@pytest.mark.parametrize("model_overrides, message", [
    (dict(act_fn="gelu"), "act_fn 'gelu'"),
    (dict(normalization_type="RMS"), "normalization_type 'RMS'"),
    (dict(d_head=16), "d_head 16"),
])
def test_earlier_config_we_cannot_represent_is_refused(tmp_path, model_overrides, message):
    folder = write_earlier_run(tmp_path / "run", epochs=(0,))
    (folder / "config.json").write_text(json.dumps(earlier_config(**model_overrides)))
    with pytest.raises(ForeignRunError, match=message):
        load_foreign_run(folder)


def test_other_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForeignRunError, match="no config.json"):
        load_foreign_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(earlier_config()))
    with pytest.raises(ForeignRunError, match="no checkpoints"):
        load_foreign_run(tmp_path / "empty")
    ours = {"format": 1, "config": preset("default").to_dict(), "model": {}}
    torch.save(ours, tmp_path / "ours.pt")
    with pytest.raises(ForeignRunError, match="already a grokking-tracked checkpoint"):
        load_foreign_run(tmp_path / "ours.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_foreign_run(tmp_path / "junk.pt")


def test_a_step_from_a_file_name_is_bounded_like_the_rest(tmp_path):
    """model_99999999999999999999999.pt once became a run whose step no store could take ("no checkpoints")."""
    torch.save(hooked_transformer_state(seed=3), tmp_path / "model_99999999999999999999999.pt")
    with pytest.raises(ForeignRunError, match="step 99,999,999,999,999,999,999,999 .* is not a training step"):
        load_foreign_run(tmp_path / "model_99999999999999999999999.pt")
    torch.save(hooked_transformer_state(seed=3), tmp_path / "model_999999999.pt")  # the largest step we take
    assert [step for step, _ in load_foreign_run(tmp_path / "model_999999999.pt").checkpoints] == [999_999_999]
