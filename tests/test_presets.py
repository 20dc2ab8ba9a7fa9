"""Power et al. 2022's two setups are two presets: the appendix's default (AdamW, weight decay 1) and Figure 1's own
(Adam, no weight decay, a budget of 10^6 steps); each is compared with the figure of its own setup."""

import dataclasses

import torch

from grokking_tracked.config import preset
from grokking_tracked.train import Trainer


def test_power_figure_1_differs_from_the_appendix_default_only_in_optimizer_decay_and_budget():
    default, figure_1 = preset("power2022"), preset("power2022_fig1")
    differing = {f.name for f in dataclasses.fields(default)
                 if getattr(default, f.name) != getattr(figure_1, f.name)}
    assert differing == {"optimizer", "weight_decay", "max_steps", "checkpoint_every"}
    assert (figure_1.optimizer, figure_1.weight_decay, figure_1.max_steps) == ("adam", 0.0, 1_000_000)
    assert (default.optimizer, default.weight_decay) == ("adamw", 1.0)


def test_power_figure_1_trains_with_plain_adam():
    trainer = Trainer(preset("power2022_fig1", max_steps=2, eval_every=2, checkpoint_every=0, device="cpu"),
                      progress=False)
    assert type(trainer.optimizer) is torch.optim.Adam
    assert all(group["weight_decay"] == 0.0 for group in trainer.optimizer.param_groups)
    assert trainer.train().final_step == 2
