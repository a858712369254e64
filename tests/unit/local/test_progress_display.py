"""The progress line `medmo run` prints per stage."""

import io

from medmo_operator import api
from medmo_operator.local.run import ProgressDisplay


def _line(stage: api.StageStatus) -> str:
    out = io.StringIO()
    status = api.MedMOTrainingStatus(phase=api.Phase.RUNNING, current_stage=stage.name, stages=[stage])
    ProgressDisplay(out).update(status, spec=None)
    return out.getvalue().strip()


def test_an_rl_stage_shows_its_mean_reward_beside_the_loss():
    rl = api.StageStatus(name="grpo", phase=api.Phase.RUNNING, step=3, total_steps=12,
                         metrics={"loss": -0.0123, "reward/total": 0.4567, "reward/bbox": 0.5, "rewardStd/total": 0.2})
    assert _line(rl).startswith("grpo       [######------------------] 3/12 loss -0.0123 reward 0.4567")
    sft = api.StageStatus(name="ground", phase=api.Phase.RUNNING, step=1, total_steps=4, metrics={"loss": 2.5})
    assert _line(sft) == "ground     [######------------------] 1/4 loss 2.5"
