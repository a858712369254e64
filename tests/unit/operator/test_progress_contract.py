"""The progress contract end to end: a report of each stage type, built by the stage's own code, goes
over HTTP to the operator's endpoint and is folded into `status.stages[]` unchanged.

The RL report comes from the real `RolloutController.collect`, with the real reward scoring behind
its reward pool; only the rollout pool is a stand-in that answers with fixed completions (generating
them needs a model, which `tests/integration/rl` runs).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from aiohttp import ClientSession
from medmo_cases import load_sample

from medmo_operator import api, render
from medmo_operator.plan import JobObservation, Observed, plan
from medmo_operator.progress import ProgressEndpoint, ProgressStore
from medmo_trainer.config import DatasetSpec
from medmo_trainer.data.schema import Record
from medmo_trainer.eval.scoring import BenchmarkScorer
from medmo_trainer.progress import KEY_PATTERN, Progress
from medmo_trainer.rl.controller import PolicyRef, PromptSampler, RolloutController
from medmo_trainer.rl.reward_server import Defaults, ScoreRequest, score_request
from medmo_trainer.stages.eval import ModelResult, flat_counters, flat_metrics
from medmo_trainer.stages.rl import UpdateMetrics, rl_progress
from medmo_trainer.stages.training import DataCounts, StepMetrics, training_progress

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
KEY = b"operator-key"
RUN = render.RunRef(name="medmo-tiny", namespace="team-a", uid="uid-1")


def _spec_ending_with(stage_name: str) -> api.MedMOTrainingSpec:
    """The tiny sample's stages up to `stage_name` (an eval stage needs a trained stage before it)."""
    obj = load_sample("medmo-tiny.yaml")
    names = [s["name"] for s in obj["spec"]["stages"]]
    obj["spec"]["stages"] = obj["spec"]["stages"][: names.index(stage_name) + 1]
    return api.parse_training(obj).spec


def _stage_config(spec: api.MedMOTrainingSpec):
    return render.build_stage_config(RUN, spec, spec.stages[-1])


def _post(report: Progress) -> ProgressStore:
    """Sends the report as the trainer's reporter does (its JSON, the run's token) to a real endpoint."""
    store = ProgressStore()
    endpoint = ProgressEndpoint(store, KEY, lambda ns, name: RUN.uid if (ns, name) == (RUN.namespace, RUN.name) else None)

    async def go():
        runner = await endpoint.serve("127.0.0.1", 0)
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/v1/namespaces/{RUN.namespace}/medmotrainings/{RUN.name}/progress"
        try:
            async with ClientSession() as session:
                headers = {"Authorization": f"Bearer {render.progress_token(RUN, KEY)}"}
                async with session.post(url, data=json.dumps(report.to_json()), headers=headers) as response:
                    assert response.status == 202, await response.text()
        finally:
            await runner.cleanup()

    asyncio.run(go())
    return store


def _folded(spec: api.MedMOTrainingSpec, store: ProgressStore) -> dict:
    """The last stage's record in the status the operator writes, as the API shows it (camelCase JSON)."""
    stage = spec.stages[-1].name
    status = plan(spec, None, Observed(), T0).status
    for earlier in spec.stages[:-1]:  # each earlier stage's Job completes, which starts the next stage
        done = JobObservation(name=f"{RUN.name}-{earlier.name}-0", attempt=0, succeeded=1, complete=True)
        status = plan(spec, status, Observed(jobs={earlier.name: done}), T0).status
    assert status.current_stage == stage
    observed = Observed(jobs={stage: JobObservation(name=f"{RUN.name}-{stage}-0", attempt=0, active=1)},
                        progress=store.latest(RUN.namespace, RUN.name))
    status = plan(spec, status, observed, T0).status
    return status.model_dump(mode="json", by_alias=True)["stages"][-1]


def _assert_round_trip(spec: api.MedMOTrainingSpec, report: Progress) -> None:
    record = _folded(spec, _post(report))
    sent = report.to_json()
    assert record["metrics"] == sent["metrics"]
    assert record["counters"] == sent["counters"]
    assert (record["step"], record["totalSteps"], record["lastCheckpoint"]) == (
        sent["step"], sent["totalSteps"], sent["lastCheckpoint"]
    )
    assert all(KEY_PATTERN.match(key) for key in [*record["metrics"], *record["counters"]])


@pytest.mark.parametrize("stage", ["align", "ground"])  # pretrain, sft
def test_a_supervised_stage_report_reaches_status_unchanged(stage):
    spec = _spec_ending_with(stage)
    metrics = StepMetrics(loss=1.75, learning_rate=2e-4, grad_norm=0.5, tokens=4096, samples=16, seconds=2.0,
                          data=DataCounts(records_read=40, skipped_by_reason={"badJson": 2, "missingImage": 1}))
    report = training_progress(_stage_config(spec), 12, 30, metrics, metrics.data, "file:///c/step-10", "Running")

    _assert_round_trip(spec, report)
    assert report.metrics == {"loss": 1.75, "learningRate": 2e-4, "gradNorm": 0.5, "tokensPerSecond": 2048.0,
                              "samplesPerSecond": 8.0}
    assert report.counters == {"recordsRead": 40, "skippedRecords": 3, "skipped/badJson": 2, "skipped/missingImage": 1}


class _FixedRollouts:
    """Rollout pool stand-in: every prompt gets `n` fixed completions."""

    def __init__(self, text: str):
        self.text = text

    def wait_ready(self, timeout_seconds: float) -> None:
        """Ready at once."""

    def map(self, path: str, bodies: list[dict]) -> list[dict]:
        assert path == "/v1/generate"
        completion = {"text": self.text, "tokenIds": [5, 6, 7], "logprobs": [-0.5] * 3, "truncated": False}
        return [
            {"results": [{"completions": [completion] * body["sampling"]["n"]} for _ in body["prompts"]],
             "generatedTokens": 3 * body["sampling"]["n"] * len(body["prompts"]), "policyVersion": 4}
            for body in bodies
        ]

    def total_failovers(self) -> int:
        return 1


class _RewardScoring:
    """Reward pool over the reward workers' own scoring function (no HTTP)."""

    def wait_ready(self, timeout_seconds: float) -> None:
        """Ready at once."""

    def map(self, path: str, bodies: list[dict]) -> list[dict]:
        assert path == "/v1/score"
        return [score_request(ScoreRequest.model_validate(body), Defaults()) for body in bodies]

    def total_failovers(self) -> int:
        return 0


def test_an_rl_stage_report_reaches_status_unchanged(tmp_path):
    spec = _spec_ending_with("grpo")
    config = _stage_config(spec)
    record = {"id": "g0", "task": "grounding", "image": "images/0.png", "prompt": "Locate every nodule with boxes.",
              "answer": "nodule <box>[[100, 100, 300, 300]]</box>", "boxes": [{"label": "nodule", "box": [100, 100, 300, 300]}]}
    (tmp_path / "rl.jsonl").write_text(json.dumps(record) + "\n{not json\n")
    sampler = PromptSampler([DatasetSpec(name="rl", uri=str(tmp_path / "rl.jsonl"))], seed=0)
    completion = "<think>one</think><answer>nodule <box>[[110, 100, 300, 290]]</box> <box>[[1, 2]]</box></answer>"
    controller = RolloutController(config, sampler, _FixedRollouts(completion), _RewardScoring())
    batch = controller.collect(step=5, policy=PolicyRef(version=4, uri="file:///p/v-4"))
    update = UpdateMetrics(loss=0.25, grad_norm=0.75, learning_rate=1e-6, clip_fraction=0.125, kl=0.01, tokens=48)

    report = rl_progress(config, 6, 20, batch, update, sampler.skipped + batch.skipped, "file:///c/step-5", "Running")

    _assert_round_trip(spec, report)
    assert {"reward/bbox", "rewardStd/bbox", "reward/total", "gradNorm", "clipFraction", "policyVersion",
            "parseFailures/bbox/malformedBoxes"} <= set(report.metrics)
    assert report.counters == {"skippedRecords": 1, "skipped/badJson": 1, "rolloutFailovers": 1, "rewardFailovers": 0}


def test_an_eval_stage_report_reaches_status_unchanged():
    spec = _spec_ending_with("bench")
    config = _stage_config(spec)
    benchmark = config.benchmarks[0].name
    results = []
    for name, answer in [(config.evaluation.model_name, "yes"), ("before-rl", "maybe")]:
        scorer = BenchmarkScorer()
        scorer.add(Record(id="v", task="vqa", image="x.png", prompt="Is there a nodule?", answer="yes",
                          answer_type="closed", options=["yes", "no"]), answer)
        means, counts = BenchmarkScorer.summary(scorer.totals())
        results.append(ModelResult(name, "file:///m", benchmarks={benchmark: means},
                                   counts={benchmark: {**counts, "skipped": 2}}))
    own = config.evaluation.model_name

    report = Progress(run=config.run, stage=config.stage, phase="Running", step=2, total_steps=2,
                      metrics=flat_metrics(results, own), counters=flat_counters(results, own))

    _assert_round_trip(spec, report)
    assert report.metrics == {f"{benchmark}/vqaClosedAcc": 1.0, f"before-rl/{benchmark}/vqaClosedAcc": 0.0}
    assert report.counters[f"before-rl/{benchmark}/unparseable"] == 1
    assert report.counters[f"{benchmark}/skipped"] == 2


@pytest.mark.parametrize("key", ["grad_norm", "Loss", "reward/", "/loss", "skipped/bad_json"])
def test_a_key_off_the_naming_rule_is_refused_where_the_trainer_writes_it(key):
    with pytest.raises(ValueError, match="camelCase"):
        Progress(run="r", stage="s", metrics={key: 1.0})
    with pytest.raises(ValueError, match="camelCase"):
        Progress(run="r", stage="s", counters={key: 1})
