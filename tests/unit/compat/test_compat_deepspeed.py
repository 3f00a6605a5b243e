"""One test per DeepSpeed assumption of `lorafleet.compat.deepspeed` (checked on deepspeed 0.19.8), without a process
group: DeepSpeed's own `load_state_dict` runs on ZeRO optimizers built without `__init__`, on a worker that
`deepspeed.comm` says is rank 1 of 2 in the optimizer's data-parallel group, with the heavy parts (the actual copies)
standing in as recorders.

Each failure message names the assumption, so a DeepSpeed upgrade that breaks one says which workaround to revisit.
"""

import pytest
from deepspeed import comm
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from lorafleet.compat import deepspeed as compat

CHECKED = "lorafleet.compat.deepspeed item {}, checked 0.19.8"
DP_GROUP = object()  # the optimizer's data-parallel group; only identity matters


@pytest.fixture(autouse=True)
def rank_1_of_2(monkeypatch):
    """This worker is rank 1 of 2 in `DP_GROUP` (a rank above 0 is what a one-element list broke)."""

    def in_dp_group(value):
        def answer(group=None):
            assert group is DP_GROUP, f"deepspeed asked about another group than the optimizer's: {group}"
            return value

        return answer

    monkeypatch.setattr(comm, "get_rank", in_dp_group(1))
    monkeypatch.setattr(comm, "get_world_size", in_dp_group(2))


class Persistent:
    """A ZeRO-3 persistent parameter (small, kept whole on every worker) that records what is done to it."""

    def __init__(self, events: list):
        self.events = events

    def partition(self, params):
        self.events.append("persistent partitioned")

    def all_gather(self, params):
        self.events.append("persistent gathered")


def stage3_optimizer(events: list) -> DeepSpeedZeroOptimizer_Stage3:
    optimizer = DeepSpeedZeroOptimizer_Stage3.__new__(DeepSpeedZeroOptimizer_Stage3)
    optimizer.elastic_checkpoint = False
    optimizer.dp_process_group = DP_GROUP
    optimizer.persistent_parameters = [Persistent(events)]
    optimizer._partition_all_parameters = lambda: events.append("all partitioned")
    optimizer.invalidate_secondary_tensor = lambda: None
    optimizer._rigid_load_state_dict = lambda state, load_optimizer_states: events.append(("loaded", state))
    return optimizer


def test_zero3_load_state_dict_reads_the_entry_at_the_data_parallel_rank():
    events, state = [], {"fp32_flat_groups": "rank 1's"}
    compat.load_zero_state(stage3_optimizer(events), state)
    loaded = [event[1] for event in events if isinstance(event, tuple)]
    assert len(loaded) == 1 and loaded[0] is state, (
        "deepspeed: DeepSpeedZeroOptimizer_Stage3.load_state_dict no longer loads "
        f"state_dict_list[get_rank(group=dp_process_group)] ({CHECKED.format(1)}): loaded {loaded}"
    )


def test_zero2_load_state_dict_reads_the_entry_at_the_data_parallel_rank():
    class Loaded(Exception):
        pass

    def load_global_state(state):
        raise Loaded(state)

    optimizer = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    optimizer.dp_process_group = DP_GROUP
    optimizer._pending_offload_events = {}
    # The first thing the rigid load does with the state it picked; stop there (the rest copies tensors).
    optimizer._load_global_state = load_global_state
    state = {"single_partition_of_fp32_groups": "rank 1's"}
    with pytest.raises(Loaded) as loaded:
        compat.load_zero_state(optimizer, state)
    assert loaded.value.args[0] is state, (
        "deepspeed: DeepSpeedZeroOptimizer.load_state_dict no longer loads "
        f"state_dict_list[get_rank(group=dp_process_group)] ({CHECKED.format(1)}): loaded {loaded.value.args[0]}"
    )


def test_zero3_load_leaves_persistent_parameters_partitioned_until_the_epilogue():
    events = []
    compat.load_zero_state(stage3_optimizer(events), {})
    assert events == ["all partitioned", ("loaded", {}), "persistent partitioned", "persistent gathered"], (
        "deepspeed: ZeRO-3's load_state_dict no longer partitions the persistent parameters and leaves gathering them "
        f"to checkpoint_event_epilogue, bracketed by checkpoint_event_prologue ({CHECKED.format(2)}): {events}"
    )
