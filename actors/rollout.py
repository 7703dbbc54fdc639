"""The rollout worker: a vLLM engine that turns prompts into scored, version-tagged groups.

Engine choice: ``AsyncLLM`` (not the offline ``LLM``). ``LLM.generate`` blocks until a whole batch
is done, so the engine idles on the batch's longest response and a weight update can only happen
between batches. ``AsyncLLM`` gives continuous batching (a finished group is replaced at once) and
``pause_generation(mode="keep"|"abort")`` / ``resume_generation``, so the version switch happens
between engine steps while requests are in flight, and vLLM tags each output token with the weight
version that produced it (``CompletionOutput.weight_versions``, set with ``update_weight_version``).

Threading: the engine lives on a private asyncio event loop in a daemon thread; the public methods
are synchronous and must be called from one thread at a time (a Ray actor's default
``max_concurrency=1`` guarantees that). Groups in flight survive across :meth:`generate_step`
calls, so a weight update between two calls meets running requests, and
``WeightSyncConfig.in_flight`` decides their fate:

* ``finish_old``: pause (keep), load, then ``reset_prefix_cache(reset_running_requests=True)``,
  which preempts the kept requests so vLLM recomputes their context under the new weights; tokens
  sampled before the switch keep their old-version span and behaviour log-probs, later ones are
  the new policy's. Rows get ``version_start < version_end``.
* ``abort_resubmit``: pause (abort), load, resume; aborted groups are resubmitted whole, so every
  row has ``version_start == version_end``.

Rows: one per response, whole groups only, ``advantage`` null (the learner computes it), pushed
to any object with ``push(table)``: a plain buffer or a Ray actor handle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from actors.admission import AdmissionRule
from actors.config import RolloutConfig
from actors.prompts import PromptItem, PromptSource, PromptSpec
from actors.rewards import RewardScorer
from buffers.replay import BUFFER_FULL, PushResult
from buffers.schema import records_to_table
from buffers.validation import DUPLICATE_GROUP_ID, DUPLICATE_TRAJ_ID, REJECT_REASONS
from tasks.data_files import ROW_REJECT_REASONS
from transports.base import WeightManifest, WeightSyncError
from transports.factory import make_receiver

log = logging.getLogger("driftrl.rollout")

WORKER_EXTENSION = "actors.vllm_extension.WeightLoaderExtension"
# skip reasons besides those of tasks.data_files.ROW_REJECT_REASONS (rollout stats, Prometheus labels)
PROMPT_TOO_LONG = "prompt_too_long"


def call_endpoint(target: Any, method: str, *args: Any, timeout_s: float) -> Any:
    """Call ``target.method(*args)`` on a plain object or a Ray actor handle alike.

    The worker pushes to "anything with ``push``" and asks "anything with ``latest``" for weights;
    in tests those are plain objects, in a run Ray handles whose methods have ``.remote``.
    """
    bound = getattr(target, method)
    remote = getattr(bound, "remote", None)
    if remote is None:
        return bound(*args)
    import ray

    return ray.get(remote(*args), timeout=timeout_s)


@dataclass
class _Group:
    """One prompt in flight: its G responses come back as one RequestOutput."""

    group_id: str
    item: PromptItem
    prompt_ids: list[int]
    temperature: float
    submitted_version: int


class RolloutWorker:
    """One vLLM engine generating groups of responses for the learner.

    Args:
        cfg: rollout config (sampling, engine, reward, weight sync).
        model_path: Hugging Face model directory (or hub name) of the initial policy.
        prompts: this actor's prompt shard (its cursor is committed after each push).
        sink: where tables go: anything with ``push(table)`` (plain buffer or Ray actor handle).
        actor_index: index among the rollout actors (engine seed offset, collective engine rank, ids).
        admission: capacity rule; None generates without limit.
        weight_source: anything with ``latest() -> WeightManifest | None`` (a
            :class:`transports.base.WeightBoard` or its Ray handle); asked once at start so a
            (re)started actor catches up before it generates.
        initial_version: policy version of the weights in ``model_path``.
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        prompts: PromptSource,
        sink: Any,
        *,
        actor_index: int = 0,
        admission: AdmissionRule | None = None,
        weight_source: Any = None,
        initial_version: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.actor_id = f"rollout-{actor_index}"
        self.prompts = prompts
        self.sink = sink
        self.admission = admission
        self._temperature = cfg.temperature
        self._receiver = make_receiver(
            cfg.weight_sync, self.actor_id, rank_offset=1 + actor_index * cfg.tensor_parallel_size
        )
        self.scorer = RewardScorer(cfg.reward)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

        self._version = initial_version
        self._learner_version = initial_version
        self._accepted_groups = 0
        self._in_flight: dict[concurrent.futures.Future, _Group] = {}
        # finished groups not yet stored by the buffer, oldest first: (table, prompt position per group)
        self._pending_push: list[tuple[pa.Table, list[int]]] = []
        self._push_retry_at = 0.0  # time.monotonic() before which no push is tried
        self._push_backoff_s = 0.0
        self._broken: str | None = None
        self._counters: dict[str, float] = {
            "groups_generated": 0,
            "responses_generated": 0,
            "tokens_generated": 0,
            "generate_seconds": 0.0,
            "engine_errors": 0,
            "resubmitted_groups": 0,
            "admission_blocked": 0,
            "syncs": 0,
            "sync_seconds_total": 0.0,
            "last_sync_seconds": 0.0,
            "push_failures": 0,
            "push_full": 0,
            "push_retries": 0,
            "push_duplicate_groups": 0,
        }
        self._skipped: dict[str, int] = dict.fromkeys((*ROW_REJECT_REASONS, PROMPT_TOO_LONG), 0)
        self._push_rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._busy_since: float | None = None
        self._last_group_done = 0.0  # perf_counter() when the engine last finished a group
        self._last_push_result: Any = None
        self._last_push_error: str | None = None

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{self.actor_id}-loop", daemon=True
        )
        self._thread.start()
        self._engine: Any = self._run(self._build_engine(model_path, actor_index), timeout_s=None)

        if weight_source is not None:
            try:
                self._catch_up(weight_source)
            except Exception as err:
                # raised from here, the error would end the actor for good: Ray restarts a process that
                # died, not a constructor that failed. Broken instead, the actor says so in stats() and
                # generate_step, and the driver restarts it, counted against rollout.max_restarts.
                self._broken = (
                    self._broken or f"catch-up from the weight board failed: {type(err).__name__}: {err}"
                )
                log.error("%s: %s", self.actor_id, self._broken)

    def _catch_up(self, weight_source: Any) -> None:
        """Load the newest published version, or join a push transport's group from its announcement."""
        timeout_s = self.cfg.weight_sync.timeout_s
        latest = call_endpoint(weight_source, "latest", timeout_s=timeout_s)
        if latest is not None and latest.version > self._version:
            self.update_weights(latest)
        elif latest is not None:
            # a push transport's announcement: join its group now, so the first sync streams at once
            self._run(self._receiver.attach(self._rpc, latest, timeout_s), timeout_s=timeout_s + 60.0)

    # -- engine plumbing ---------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _build_engine(self, model_path: str, actor_index: int) -> Any:
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.cfg
        args = AsyncEngineArgs(
            model=model_path,
            dtype=cfg.dtype,
            seed=cfg.seed + actor_index,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # CUDA graphs help on GPUs only; the CPU backend runs eagerly anyway.
            enforce_eager=not torch.cuda.is_available(),
            # The distribution actually sampled (after temperature/top-p): behaviour log-probs.
            logprobs_mode="processed_logprobs",
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
        )
        engine = AsyncLLM.from_engine_args(args)
        # Until the first sync the engine labels tokens "default"; label them with our integer version.
        await engine.update_weight_version(str(self._version))
        self._resumed = asyncio.Event()
        self._resumed.set()
        return engine

    async def _rpc(self, method: str, args: tuple, timeout_s: float) -> list[Any]:
        return await self._engine.collective_rpc(method, timeout=timeout_s, args=args)

    def _sampling_params(self, temperature: float) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=self.cfg.group_size,
            temperature=temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            logprobs=0,  # exactly the sampled token's log-prob per position
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,  # rewards decode with the HF tokenizer (special tokens skipped)
        )

    async def _generate_group(self, group: _Group) -> Any:
        """Run one group to completion; a group aborted by a weight sync is resubmitted whole."""
        params = self._sampling_params(group.temperature)
        attempt = 0
        while True:
            await self._resumed.wait()
            final = None
            request_id = f"{group.group_id}#{attempt}"
            async for output in self._engine.generate(
                {"prompt_token_ids": group.prompt_ids}, params, request_id
            ):
                final = output
            if final is None:
                raise RuntimeError(f"engine returned no output for {request_id}")
            if not any(c.finish_reason == "abort" for c in final.outputs):
                self._last_group_done = time.perf_counter()
                return final
            attempt += 1
            self._counters["resubmitted_groups"] += 1

    # -- weights -----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Policy version of the engine's current weights."""
        return self._version

    def update_weights(
        self, manifest: WeightManifest, in_flight: Literal["finish_old", "abort_resubmit"] | None = None
    ) -> float:
        """Load ``manifest``'s weights between engine steps; returns the seconds it took.

        Args:
            manifest: a published version; one not newer than the current version is ignored.
            in_flight: what happens to running requests (default: ``cfg.weight_sync.in_flight``).

        Raises:
            WeightSyncError / WeightSyncTimeoutError: the engine may hold mixed weights; the worker
                refuses to generate from then on (restart the actor).
        """
        self._check_usable()
        if manifest.version <= self._version:
            return 0.0
        if manifest.transport != self.cfg.weight_sync.transport:
            raise WeightSyncError(
                f"{self.actor_id}: manifest uses transport {manifest.transport!r}, this actor is configured "
                f"for {self.cfg.weight_sync.transport!r}"
            )
        mode = in_flight or self.cfg.weight_sync.in_flight
        started = time.perf_counter()
        # The receiver enforces timeout_s itself; the extra margin only covers pause/resume.
        self._run(self._sync(manifest, mode), timeout_s=self.cfg.weight_sync.timeout_s + 60.0)
        seconds = time.perf_counter() - started
        self._counters["syncs"] += 1
        self._counters["sync_seconds_total"] += seconds
        self._counters["last_sync_seconds"] = seconds
        return seconds

    async def _sync(self, manifest: WeightManifest, mode: str) -> None:
        engine = self._engine
        self._resumed.clear()  # aborted groups wait here before resubmitting
        if mode == "abort_resubmit":
            await engine.pause_generation(mode="abort", clear_cache=True)
        else:
            # Keep the KV cache: the kept requests still own their blocks.
            await engine.pause_generation(mode="keep", clear_cache=False)
        try:
            await self._receiver.receive(self._rpc, manifest, self.cfg.weight_sync.timeout_s)
            # Cached prefixes (and, under keep, running requests' KV) were computed with the old
            # weights: preempting the running requests lets the cache be dropped, and vLLM recomputes
            # their context with the new weights when they resume.
            if not await engine.reset_prefix_cache(reset_running_requests=True):
                raise WeightSyncError(
                    f"{self.actor_id}: vLLM refused to reset the prefix cache after loading"
                )
            # a push transport may deliver a newer version than asked for (a late joiner's catch-up)
            loaded = max(manifest.version, self._receiver.loaded_version or manifest.version)
            await engine.update_weight_version(str(loaded))
        except BaseException as err:
            self._broken = f"weight sync to version {manifest.version} failed: {err}"
            raise
        self._version = loaded
        self._learner_version = max(self._learner_version, loaded)
        await engine.resume_generation()
        self._resumed.set()

    # -- generation --------------------------------------------------------------------------------

    def set_learner_version(self, learner_version: int, accepted_groups: int | None = None) -> None:
        """Tell the admission rule where the learner is (and, optionally, the buffer's accepted count)."""
        self._learner_version = learner_version
        if accepted_groups is not None:
            self._accepted_groups = accepted_groups

    def set_temperature(self, temperature: float) -> None:
        """Sampling temperature of groups submitted from now on (rows record the one they used)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._temperature = temperature

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise WeightSyncError(f"{self.actor_id} cannot generate: {self._broken}; restart the actor")

    def _skip(self, reason: str) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + 1

    def _top_up(self) -> None:
        """Submit prompts until the in-flight limit or the admission rule stops it."""
        consecutive_skips = 0
        while len(self._in_flight) + self._pending_groups() < self.cfg.prompts_per_request:
            in_flight = len(self._in_flight) + self._pending_groups()
            if self.admission is not None and not self.admission.admits(
                self._learner_version, self._accepted_groups, in_flight
            ):
                self._counters["admission_blocked"] += 1
                return
            item = self.prompts.next()
            reason = item.rejected  # a null or blank prompt or answer
            if reason is None:
                prompt_ids = list(self.tokenizer(item.prompt)["input_ids"])
                # vLLM rejects a request whose prompt plus max_tokens exceeds max_model_len.
                if len(prompt_ids) + self.cfg.max_tokens > self.cfg.max_model_len:
                    reason = PROMPT_TOO_LONG
            if reason is None:
                self._submit(item, prompt_ids)
                consecutive_skips = 0
                continue
            self._skip(reason)
            consecutive_skips += 1
            if consecutive_skips >= len(self.prompts):
                raise ValueError(
                    f"{self.actor_id}: every prompt of {self.prompts.spec.path} (shard {self.prompts.shard_index}) "
                    f"is skipped: {self._skipped}; max_model_len={self.cfg.max_model_len}, "
                    f"max_tokens={self.cfg.max_tokens}"
                )

    def _submit(self, item: PromptItem, prompt_ids: list[int]) -> None:
        group = _Group(
            # Unique across restarts: a restarted actor regenerates in-flight positions.
            group_id=f"{self.actor_id}:{item.position}:{uuid.uuid4().hex[:8]}",
            item=item,
            prompt_ids=prompt_ids,
            temperature=self._temperature,
            submitted_version=self._version,
        )
        future = asyncio.run_coroutine_threadsafe(self._generate_group(group), self._loop)
        if self._busy_since is not None and all(f.done() for f in self._in_flight):
            # the engine went idle after its last group and this call is the first to see it
            self._mark_idle_if_empty(force=True)
        if self._busy_since is None:
            self._busy_since = time.perf_counter()
        self._in_flight[future] = group

    def _pending_groups(self) -> int:
        return sum(len(positions) for _, positions in self._pending_push)

    def _mark_idle_if_empty(self, force: bool = False) -> None:
        if (force or not self._in_flight) and self._busy_since is not None:
            # busy ends when the last group finished, not when a call noticed: in sync mode no call
            # comes while the learner trains, and that wait is not generation (tokens_per_s)
            self._counters["generate_seconds"] += max(self._last_group_done - self._busy_since, 0.0)
            self._busy_since = None

    def generate_step(
        self,
        learner_version: int | None = None,
        accepted_groups: int | None = None,
        wait_s: float | None = None,
    ) -> int:
        """Top up the engine, wait for at least one group, score and push every finished group.

        Args:
            learner_version: the learner's current policy version (admission), if known.
            accepted_groups: groups the buffer has accepted in total (admission), if known.
            wait_s: longest wait for a group (default ``cfg.step_timeout_s``).

        Returns:
            Groups pushed by this call (0: admission blocked with nothing in flight, or timeout).
        """
        self._check_usable()
        if learner_version is not None or accepted_groups is not None:
            self.set_learner_version(
                self._learner_version if learner_version is None else learner_version, accepted_groups
            )
        wait_s = self.cfg.step_timeout_s if wait_s is None else wait_s
        pushed = self._push_pending()
        self._top_up()
        if not self._in_flight:
            if self._pending_push:
                # nothing to generate while the buffer holds back our groups: wait for the retry here
                # rather than answer at once and be called again in a busy loop
                time.sleep(min(max(self._push_retry_at - time.monotonic(), 0.0), wait_s))
                pushed += self._push_pending()
                self.prompts.commit(self._committed_position())
            return pushed
        done, _ = concurrent.futures.wait(
            list(self._in_flight), timeout=wait_s, return_when=concurrent.futures.FIRST_COMPLETED
        )
        finished: list[tuple[_Group, Any]] = []
        for future in done:
            group = self._in_flight.pop(future)
            try:
                finished.append((group, future.result()))
            except Exception as err:
                from vllm.v1.engine.exceptions import EngineDeadError

                if isinstance(err, EngineDeadError):
                    self._broken = f"vLLM engine died: {err}"
                    raise
                self._counters["engine_errors"] += 1
                self._skip(f"engine_error:{type(err).__name__}")
        self._mark_idle_if_empty()
        if finished:
            self._pending_push.append((self._build_table(finished), [g.item.position for g, _ in finished]))
            pushed += self._push_pending()
        self.prompts.commit(self._committed_position())
        self._top_up()  # keep the engine busy while the caller works between steps
        return pushed

    def run_until(self, stop: Callable[[], bool], idle_sleep_s: float = 0.05) -> int:
        """Call :meth:`generate_step` until ``stop()``; returns groups pushed."""
        total = 0
        while not stop():
            pushed = self.generate_step()
            total += pushed
            if pushed == 0 and not self._in_flight:
                time.sleep(idle_sleep_s)  # admission blocked: the driver will raise the version
        return total

    def _committed_position(self) -> int:
        """Low-water mark: the oldest position whose group the buffer has not stored yet (generating,
        or waiting to be pushed again), so a restart never skips a group (see actors/prompts.py)."""
        positions = [g.item.position for g in self._in_flight.values()]
        positions += [position for _, group_positions in self._pending_push for position in group_positions]
        return min(positions, default=self.prompts.next_position)

    def _build_table(self, finished: list[tuple[_Group, Any]]) -> pa.Table:
        responses: list[list[int]] = []
        for _, output in finished:
            responses.extend(list(c.token_ids) for c in output.outputs)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        answers = [group.item.answer for group, output in finished for _ in output.outputs]
        rewards = self.scorer.score(texts, answers)

        records = []
        index = 0
        now = time.time()
        for group, output in finished:
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                logprobs = [
                    position[token].logprob
                    for token, position in zip(token_ids, completion.logprobs or [], strict=True)
                ]
                versions = [
                    int(span.version) for span in completion.weight_versions or [] if span.end > span.start
                ] or [group.submitted_version]
                records.append(
                    {
                        "traj_id": f"{group.group_id}/{completion.index}",
                        "prompt_id": group.item.prompt_id,
                        "group_id": group.group_id,
                        "group_size": len(output.outputs),
                        "prompt_ids": group.prompt_ids,
                        "response_ids": token_ids,
                        "behaviour_logprobs": logprobs,
                        "temperature": group.temperature,
                        "reward": rewards[index],
                        "version_start": min(versions),
                        "version_end": max(versions),
                        "actor_id": self.actor_id,
                        "finish_reason": completion.finish_reason or "unknown",
                        "created_at": now,
                    }
                )
                self._counters["tokens_generated"] += len(token_ids)
                index += 1
            self._counters["groups_generated"] += 1
            self._counters["responses_generated"] += len(output.outputs)
        return records_to_table(records)

    def _push_pending(self) -> int:
        """Push every waiting group in one call, unless a retry is not due yet; returns groups stored.

        The buffer's answer decides each group's fate (a group is the unit: the buffer takes or
        refuses it whole):

        * stored: counted in ``accepted_groups``;
        * refused for room (``buffer_full``): kept, oldest first, and pushed again after a backoff;
        * every row a duplicate: an earlier attempt was stored (its reply was lost): counted stored;
        * rejected by validation: dropped for good, its rows counted by reason (``push_rejected_rows``).

        A push that raises (buffer restarting, Ray timeout) keeps everything and backs off too.
        """
        if not self._pending_push or time.monotonic() < self._push_retry_at:
            return 0
        if self._push_backoff_s > 0:
            self._counters["push_retries"] += 1
        tables = [table for table, _ in self._pending_push]
        positions = [position for _, group_positions in self._pending_push for position in group_positions]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        try:
            result = call_endpoint(self.sink, "push", table, timeout_s=self.cfg.push_timeout_s)
        except Exception as err:
            # A buffer restarting (Ray) or briefly unreachable: keep the rows and retry later;
            # pending groups count as in flight for admission, so nothing piles up without bound.
            self._counters["push_failures"] += 1
            self._last_push_error = f"{type(err).__name__}: {err}"
            self._back_off()
            return 0
        self._last_push_result = result
        rejected = result.rejected if isinstance(result, PushResult) else []
        group_ids = list(dict.fromkeys(table.column("group_id").to_pylist()))
        group_of = dict(
            zip(table.column("traj_id").to_pylist(), table.column("group_id").to_pylist(), strict=True)
        )
        reasons: dict[str, set[str]] = {}  # group_id -> reasons of its rejected rows
        for traj_id, reason in rejected:
            # "<unknown>" ids: the whole push was unreadable (a bug here), so every group shares the fate
            for group_id in [group_of[traj_id]] if traj_id in group_of else group_ids:
                reasons.setdefault(group_id, set()).add(reason)
        keep = [g for g in group_ids if BUFFER_FULL in reasons.get(g, ())]
        duplicates = [g for g, why in reasons.items() if why <= {DUPLICATE_TRAJ_ID, DUPLICATE_GROUP_ID}]
        stored = len(group_ids) - len(reasons) + len(duplicates)
        self._counters["push_duplicate_groups"] += len(duplicates)
        dropped = set(reasons) - set(keep) - set(duplicates)
        for traj_id, reason in rejected:
            if group_of.get(traj_id) in dropped or (traj_id not in group_of and dropped):
                self._push_rejected[reason] = self._push_rejected.get(reason, 0) + 1
        self._accepted_groups += stored
        self._pending_push = []
        if keep:
            self._counters["push_full"] += 1
            kept = set(keep)
            mask = pc.is_in(table.column("group_id"), pa.array(keep))
            by_group = dict(zip(group_ids, positions, strict=True))
            self._pending_push.append((table.filter(mask), [by_group[g] for g in group_ids if g in kept]))
            self._back_off()
        else:
            self._push_backoff_s = 0.0
            self._push_retry_at = 0.0
        return stored

    def _back_off(self) -> None:
        """Schedule the next push attempt: push_retry_initial_s, doubled per failure, capped."""
        cfg = self.cfg
        self._push_backoff_s = min(
            max(2 * self._push_backoff_s, cfg.push_retry_initial_s), cfg.push_retry_max_s
        )
        self._push_retry_at = time.monotonic() + self._push_backoff_s

    # -- reporting and shutdown --------------------------------------------------------------------

    def engine_weights(self) -> bytes:
        """The weights the engine computes with (TP rank 0), HF-named safetensors bytes: tests compare
        them with the learner's after a sync (small models only, see ``driftrl_export_weights``)."""
        self._check_usable()
        return self._run(self._rpc("driftrl_export_weights", (), self.cfg.weight_sync.timeout_s), None)[0]

    def cursor(self) -> dict[str, Any]:
        """The prompt cursor as committed (what a restart resumes from)."""
        return self.prompts.state(self._committed_position())

    def stats(self) -> dict[str, Any]:
        """Cumulative counters for the driver's metrics (names carry units)."""
        counters = dict(self._counters)
        busy_s = counters["generate_seconds"]
        if self._busy_since is not None:
            idle = all(f.done() for f in self._in_flight)
            busy_s += max((self._last_group_done if idle else time.perf_counter()) - self._busy_since, 0.0)
        reward = self.scorer.stats
        return {
            "actor_id": self.actor_id,
            # a new process id tells the driver Ray restarted this actor, even between calls
            "pid": os.getpid(),
            "weight_version": self._version,
            "learner_version": self._learner_version,
            "accepted_groups": self._accepted_groups,
            "in_flight_groups": len(self._in_flight),
            "pending_push_groups": self._pending_groups(),
            "push_retry_in_s": max(self._push_retry_at - time.monotonic(), 0.0)
            if self._pending_push
            else 0.0,
            "push_rejected_rows": dict(self._push_rejected),
            **counters,
            "generate_seconds": busy_s,
            "tokens_per_s": counters["tokens_generated"] / busy_s if busy_s > 0 else 0.0,
            "reward_calls": reward.calls,
            "reward_mean": reward.reward_sum / reward.calls if reward.calls else 0.0,
            "reward_errors": reward.errors,
            "reward_timeouts": reward.timeouts,
            "reward_nonfinite": reward.nonfinite,
            "reward_over_budget": reward.over_budget,
            "reward_last_error": reward.last_error,
            "skipped_prompts": dict(self._skipped),
            "last_push_result": self._last_push_result,
            "last_push_error": self._last_push_error,
            "broken": self._broken,
            "prompt_cursor": self.cursor(),
        }

    def close(self) -> None:
        """Abort in-flight groups, stop the engine and the reward process."""
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
            self._engine = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.scorer.close()


class RolloutActor(RolloutWorker):
    """The Ray actor shell: builds its prompt shard from a spec and adds ``pid``/``run``.

    Args:
        cfg: rollout config.
        model_path: initial policy.
        prompt_spec: the dataset; this actor takes shard ``actor_index`` of ``num_actors``.
        buffer_handle: the replay buffer (Ray handle or plain object with ``push``).
        actor_index: this actor's index.
        num_actors: number of rollout actors (prompt shards).
        run_dir: run directory; the prompt cursor lives in ``<run_dir>/rollout/``.
        admission: capacity rule.
        weight_board: handle with ``latest()`` (restarts catch up from it).
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        prompt_spec: PromptSpec,
        buffer_handle: Any,
        actor_index: int,
        num_actors: int,
        run_dir: str | None = None,
        admission: AdmissionRule | None = None,
        weight_board: Any = None,
    ) -> None:
        cursor_path = None
        if run_dir is not None:
            cursor_path = Path(run_dir) / "rollout" / f"prompt_cursor_{actor_index}.json"
        prompts = PromptSource(prompt_spec, actor_index, num_actors, cursor_path)
        super().__init__(
            cfg,
            model_path,
            prompts,
            buffer_handle,
            actor_index=actor_index,
            admission=admission,
            weight_source=weight_board,
        )

    def pid(self) -> int:
        """This actor's process id (tests kill it to exercise restarts)."""
        return os.getpid()

    def run(self, max_groups: int | None = None, max_seconds: float | None = None) -> int:
        """Generate until ``max_groups`` groups were pushed or ``max_seconds`` passed."""
        if max_groups is None and max_seconds is None:
            raise ValueError("give max_groups or max_seconds")
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        start = int(self._counters["groups_generated"])

        def stop() -> bool:
            done = int(self._counters["groups_generated"]) - start
            return (max_groups is not None and done >= max_groups) or (
                deadline is not None and time.monotonic() >= deadline
            )

        return self.run_until(stop)


def launch_rollout_actors(
    cfg: RolloutConfig,
    model_path: str,
    prompt_spec: PromptSpec,
    buffer_handle: Any,
    *,
    run_dir: str | None = None,
    admission: AdmissionRule | None = None,
    weight_board: Any = None,
) -> list[Any]:
    """Start ``cfg.num_actors`` :class:`RolloutActor` s with the config's Ray resources and restarts.

    ``max_task_retries=0``: a call in flight when the actor dies fails (the driver sees it and calls
    again) instead of being replayed against a half-restarted engine. Tensor parallelism > 1 inside
    one actor needs a placement group for vLLM's own workers; not handled here.
    """
    import ray

    actor_cls = ray.remote(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts, max_task_retries=0
    )(RolloutActor)
    return [
        actor_cls.remote(
            cfg,
            model_path,
            prompt_spec,
            buffer_handle,
            index,
            cfg.num_actors,
            run_dir=run_dir,
            admission=admission,
            weight_board=weight_board,
        )
        for index in range(cfg.num_actors)
    ]
