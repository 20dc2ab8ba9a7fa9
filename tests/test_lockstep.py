"""Lockstep training of K models equals training each alone with Trainer (float tolerance)."""

import pytest
import torch

from grokking_tracked.config import preset
from grokking_tracked.lockstep import LockstepTrainer, check_compatible
from grokking_tracked.train import Callback, Trainer, TrainingStopped


SMALL = dict(p=23, d_model=32, d_mlp=64, n_heads=4, max_steps=50, eval_every=10, checkpoint_every=0)
TRIALS = [dict(lr=1e-2, weight_decay=1.0, train_frac=0.3, seed=1, data_seed=11),
          dict(lr=3e-3, weight_decay=0.1, train_frac=0.5, seed=2, data_seed=12),
          dict(lr=1e-3, weight_decay=0.0, train_frac=0.7, seed=3, data_seed=13)]


def test_lockstep_equals_one_by_one(monkeypatch):
    # Lockstep differentiates the model with autograd, so the one-by-one runs do too: at lr 1e-2 the first trial
    # is chaotic (weights scaled by 1 + 2**-23 end 50 steps outside this tolerance), so only the same arithmetic
    # can be compared. tests/test_fastpath.py shows the Trainer's hand-written step equals autograd's.
    monkeypatch.setenv("GROKKING_FASTPATH", "0")
    configs = [preset("default", **SMALL, **t) for t in TRIALS]
    lockstep = LockstepTrainer(configs, progress=False)
    results = lockstep.train()
    assert len(results) == 3
    for k, config in enumerate(configs):
        alone = Trainer(config, progress=False)
        expected = alone.train()
        got = results[k]
        assert got.final_step == expected.final_step == 50
        assert got.stop_reason == expected.stop_reason
        assert [s for s, _ in got.history] == [s for s, _ in expected.history] == [0, 10, 20, 30, 40, 50]
        for (_, m_got), (_, m_exp) in zip(got.history, expected.history):
            for name in ("train_loss", "test_loss", "weight_norm", "grad_norm"):
                assert m_got[name] == pytest.approx(m_exp[name], rel=1e-4, abs=1e-5), (k, name)
            for name in ("train_acc", "test_acc", "lr"):
                assert m_got[name] == pytest.approx(m_exp[name], abs=2e-3), (k, name)
        assert [e["event"] for e in got.events] == [e["event"] for e in expected.events]
        for (name, p_got), (_, p_exp) in zip(lockstep.members[k].model.named_parameters(),
                                             alone.model.named_parameters()):
            torch.testing.assert_close(p_got, p_exp, rtol=1e-4, atol=1e-5, msg=f"model {k} {name}")
        # a lockstep member's checkpoint is a Trainer checkpoint: resumed alone it goes on as the lone model does
        state = lockstep.state_dict(k)
        assert state.keys() == alone.state_dict().keys()
        longer = config.replace(max_steps=60)
        from_lockstep, from_alone = Trainer(longer, progress=False), Trainer(longer, progress=False)
        from_lockstep.load_state_dict(state)
        from_alone.load_state_dict(alone.state_dict())
        from_lockstep.train(), from_alone.train()
        for p_got, p_exp in zip(from_lockstep.model.parameters(), from_alone.model.parameters()):
            torch.testing.assert_close(p_got, p_exp, rtol=1e-4, atol=1e-5, msg=f"model {k} resumed")


def test_stop_one_model_leaves_the_others_running():
    configs = [preset("default", **SMALL, **t) for t in TRIALS]

    class PruneAt20(Callback):
        def __init__(self):
            self.stopped_with = None

        def on_eval(self, run, step, metrics, events):
            if step == 20:
                raise TrainingStopped("pruned")

        def on_train_stopped(self, run, error):
            self.stopped_with = (run.step, error)

    prune = PruneAt20()
    lockstep = LockstepTrainer(configs, member_callbacks=[[prune], [], []], progress=False)
    results = lockstep.train()
    assert results[0].stop_reason == "stopped" and results[0].final_step == 20
    assert prune.stopped_with[0] == 20 and isinstance(prune.stopped_with[1], TrainingStopped)
    assert [s for s, _ in results[0].history] == [0, 10, 20]
    assert results[1].final_step == results[2].final_step == 50
    alone = Trainer(configs[1], progress=False)
    alone.train()
    for p_got, p_exp in zip(lockstep.members[1].model.parameters(), alone.model.parameters()):
        torch.testing.assert_close(p_got, p_exp, rtol=1e-4, atol=1e-5)


def test_incompatible_configs_are_refused():
    with pytest.raises(ValueError, match="share 'p'"):
        check_compatible([preset("default", p=23), preset("default", p=29)])
    with pytest.raises(ValueError, match="lr_schedule"):
        check_compatible([preset("default", lr_schedule="cyclic")])
