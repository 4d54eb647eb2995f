import dataclasses
import struct

import msgpack
import numpy as np
import pytest

from common.rollout import RolloutGroup, SchemaError
from common.wire import COPY_BELOW, Frames, WireError, decode, encode
from tests.conftest import make_group


def test_rollout_group_survives_the_wire_unchanged():
    group = make_group(version=3, prompt_id="p1", actor_id=2, temperature=0.7, timings={"generate_s": 1.5})
    frames = [bytes(f) for f in encode(group.to_wire())]
    back = RolloutGroup.from_wire(decode(frames))
    for name in ("tokens", "loss_mask", "behaviour_logprobs", "lengths", "rewards", "token_versions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(group, name))
        assert getattr(back, name).dtype == getattr(group, name).dtype
    assert (back.id, back.prompt_id, back.actor_id, back.temperature) == (group.id, "p1", 2, 0.7)
    assert back.turn_rewards == group.turn_rewards and back.errors == group.errors
    assert back.timings == {"generate_s": 1.5} and back.version == 3


def test_arrays_travel_as_separate_raw_frames():
    tokens = np.arange(1000, dtype=np.int32)
    frames = encode({"x": tokens})
    assert len(frames) == 2 and bytes(frames[1]) == tokens.tobytes()
    assert len(frames[0]) < 100  # the header carries no array bytes


@pytest.mark.parametrize("frames, message", [
    ([], "empty message"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb({"a": {"__nd__": [1, "<i4", [4]]}}), b"\x00" * 3], "needs 16"),
    ([msgpack.packb({"a": {"__nd__": [2, "<i4", [1]]}}), b"\x00" * 4], "frame 2"),
    ([msgpack.packb({"a": {"__nd__": [1, "|O", [1]]}}), b"\x00" * 8], "not allowed"),
    ([msgpack.packb({"a": 1}), b"extra"], "not referenced"),
])
def test_malformed_messages_raise_wire_error_naming_the_part(frames, message):
    with pytest.raises(WireError, match=message):
        decode(frames)


def _run_ref(first, count) -> msgpack.ExtType:
    return msgpack.ExtType(1, first.to_bytes(4, "little") + count.to_bytes(4, "little"))


def _packed_ref(frame, offset, lengths) -> msgpack.ExtType:
    return msgpack.ExtType(2, struct.pack(f"<III{len(lengths)}I", frame, offset, len(lengths), *lengths))


@pytest.mark.parametrize("frames, message", [
    ([msgpack.packb([_run_ref(1, 3)]), b"a", b"b"], r"frame run 1..3 of 2 frames"),
    ([msgpack.packb([_packed_ref(1, 0, [4, 9])]), b"x" * 16], "reaches byte 17 of frame 1, which holds 16"),
    ([msgpack.packb([_packed_ref(2, 0, [1])]), b"x"], "packed run in frame 2 of 1 frames"),
    ([msgpack.packb([_packed_ref(0, 0, [1])]), b"x"], "packed run in frame 0"),
    ([msgpack.packb([msgpack.ExtType(2, struct.pack("<III", 1, 0, 2))]), b"x"], "packed run of 2 arrays"),
    ([msgpack.packb([_run_ref(1, 1), _packed_ref(1, 0, [1])]), b"x"], "packed run in frame 1"),
    ([msgpack.packb([_packed_ref(1, 0, [1]), _run_ref(1, 1)]), b"x"], r"frame run 1..1"),
    ([msgpack.packb([_packed_ref(1, 0, [1]), {"__nd__": [1, "|u1", [1]]}]), b"x"], "array reference to frame 1"),
    ([msgpack.packb([_packed_ref(1, 0, [1])]), b"x", b"y"], "1 frame.s. not referenced"),
    ([msgpack.packb([_run_ref(0, 1)]), b"a"], r"frame run 0..0"),
    ([msgpack.packb([_run_ref(1, 1), _run_ref(1, 1)]), b"a"], r"frame run 1..1 of 1 frames"),
    ([msgpack.packb([{"__nd__": [1, "|u1", [1]]}, _run_ref(1, 1)]), b"a"], r"frame run 1..1"),
    ([msgpack.packb([msgpack.ExtType(5, b"12345678")])], "unknown msgpack extension 5"),
    ([msgpack.packb([msgpack.ExtType(1, b"123")])], "unknown msgpack extension 1 of 3 bytes"),
    ([msgpack.packb([_run_ref(1, 1)]), b"a", b"b"], "1 frame.s. not referenced"),
    ([msgpack.packb([_packed_ref(1, 0, [8]), _packed_ref(1, 0, [8])]), b"x" * 8], "packed runs overlap in frame 1 at byte 0"),
    ([msgpack.packb([_packed_ref(1, 8, [8]), _packed_ref(1, 0, [12])]), b"x" * 16], "packed runs overlap in frame 1 at byte 8"),
])
def test_malformed_frame_runs_raise_wire_error_naming_the_part(frames, message):
    with pytest.raises(WireError, match=message):
        decode(frames)


ARRAYS = ("tokens", "loss_mask", "behaviour_logprobs", "lengths", "rewards", "token_versions")


def test_a_large_group_is_one_run_of_frames_and_a_header_without_a_map_per_array():
    group = make_group(length=COPY_BELOW // 4)   # its tokens alone are 4x COPY_BELOW
    frames = encode(group.to_wire())
    assert len(frames) == 1 + 6 and b"__nd__" not in bytes(frames[0]) and b"tokens" not in bytes(frames[0])
    assert [bytes(f) for f in frames[1:]] == [getattr(group, name).tobytes() for name in ARRAYS]


def test_small_groups_share_one_frame_each_array_at_an_8_byte_boundary():
    groups = [make_group(length=5 + i, seed=i) for i in range(16)]
    frames = encode({"groups": [g.to_wire() for g in groups]})
    assert len(frames) == 2   # a sample of 16 small groups: a header and one frame
    expected = b""
    for g in groups:
        for name in ARRAYS:
            data = getattr(g, name).tobytes()
            expected += data + bytes(-len(data) % 8)
    assert bytes(frames[1]) == expected
    back = [RolloutGroup.from_wire(w) for w in decode([bytes(f) for f in frames])["groups"]]
    for g, b in zip(groups, back):
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(b, name), getattr(g, name))


def test_small_and_large_groups_travel_together():
    groups = [make_group(seed=0), make_group(length=COPY_BELOW // 4, seed=1), make_group(seed=2)]
    frames = encode([g.to_wire() for g in groups])
    assert len(frames) == 1 + 6 + 1   # the large one's 6 frames, the small ones' one shared frame
    back = [RolloutGroup.from_wire(w) for w in decode([bytes(f) for f in frames])]
    assert [b.id for b in back] == [g.id for g in groups]
    assert all((b.tokens == g.tokens).all() and (b.behaviour_logprobs == g.behaviour_logprobs).all()
               for b, g in zip(back, groups))


@pytest.mark.parametrize("edit, message", [
    (lambda wire: wire[:-1], "a rollout group must be"),
    (lambda wire: [[4], *wire[1:]], r"tokens: must be a 2-D array \[G, T\]"),
    (lambda wire: [[4, -1], *wire[1:]], r"tokens: must be a 2-D array \[G, T\]"),
    (lambda wire: [[0, 6], *wire[1:]], "tokens: a group needs at least one completion"),
    (lambda wire: [[5, 6], *wire[1:]], r"tokens: shape must be \(5, 6\) \(G, T\) of int32; its frame holds 96"),
    (lambda wire: [wire[0], wire[1], Frames(wire[2].items[:5]), *wire[3:]], "its 6 arrays as one run of frames"),
    (lambda wire: [wire[0], wire[1], 7, *wire[3:]], "its 6 arrays as one run of frames, got int"),
    (lambda wire: [wire[0], wire[1].replace("<f4", "<f8", 1), *wire[2:]], "behaviour_logprobs: dtype must be float32"),
    (lambda wire: [wire[0], 3, *wire[2:]], "the arrays' dtypes must be"),
])
def test_a_malformed_group_header_is_refused_naming_the_part(edit, message):
    wire = make_group().to_wire()
    with pytest.raises(SchemaError, match=message):
        RolloutGroup.from_wire(decode([bytes(f) for f in encode(edit(wire))]))


def test_a_group_as_a_map_of_fields_is_read_too_as_older_checkpoints_hold_it():
    group = make_group(version=4)
    fields = {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}
    back = RolloutGroup.from_wire(decode([bytes(f) for f in encode(fields)]))
    assert back.id == group.id and back.version == 4 and (back.tokens == group.tokens).all()
    with pytest.raises(SchemaError, match=r"unknown fields \['colour'\]"):
        RolloutGroup.from_wire({**fields, "colour": 1})


def test_object_arrays_are_refused_when_encoding():
    with pytest.raises(WireError, match="dtype object"):
        encode({"x": np.array([object()])})


@pytest.mark.parametrize("field, value, message", [
    ("tokens", np.zeros((4, 6), dtype=np.int64), "tokens: dtype must be int32"),
    ("rewards", np.zeros(3, dtype=np.float32), r"rewards: shape must be \(4,\)"),
    ("behaviour_logprobs", np.ones((4, 6), dtype=np.float32), "behaviour_logprobs: must be finite and <= 0"),
    ("errors", ["", ""], "errors: must be a list of 4 entries"),
])
def test_schema_violations_name_the_field(field, value, message):
    with pytest.raises(SchemaError, match=message):
        _through_wire(make_group(), **{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("id", "", "id: must be a non-empty string"),
    ("id", ["a"], "id: must be a non-empty string, got list"),
    ("prompt_id", 3, "prompt_id: must be a string"),
    ("actor_id", "one", "actor_id: must be an integer"),
    ("actor_id", True, "actor_id: must be an integer"),
    ("temperature", float("inf"), "temperature: must be a finite number > 0"),
    ("timings", {"generate_s": float("nan")}, "timings: must map names to finite numbers"),
    ("timings", {1: 1.0}, "timings: must map names to finite numbers"),
    ("turn_rewards", [[1.0], [float("inf")], [0.0], [0.0]], "turn_rewards: row 1 must be a list of finite numbers"),
    ("turn_rewards", [1.0, 1.0, 1.0, 1.0], "turn_rewards: row 0 must be a list of finite numbers"),
    ("errors", ["", 3, "", ""], "errors: row 1 must be a string"),
    ("created_at", float("nan"), "created_at: must be a finite number"),
])
def test_malformed_metadata_is_refused_naming_the_field(field, value, message):
    with pytest.raises(SchemaError, match=message):   # as a sender's group (msgpack allows no int key)
        dataclasses.replace(make_group(), **{field: value}).validate()
    if field != "timings" or "1" not in str(value):
        with pytest.raises(SchemaError, match=message):
            _through_wire(make_group(), **{field: value})


def _through_wire(group: RolloutGroup, **changes) -> RolloutGroup:
    """The group, with `changes`, sent and read as a buffer reads it."""
    return RolloutGroup.from_wire(decode([bytes(f) for f in encode(dataclasses.replace(group, **changes).to_wire())]))


def _with(group: RolloutGroup, name: str, edit) -> dict:
    value = getattr(group, name).copy()
    edit(value)
    return {name: value}


@pytest.mark.parametrize("field, edit, message", [
    ("lengths", lambda a: a.__setitem__(0, -1), "lengths: each must lie in"),
    ("lengths", lambda a: a.__setitem__(1, 7), "lengths: each must lie in"),
    ("loss_mask", lambda a: a.__setitem__((0, 3), 2), "loss_mask: values must be 0 or 1"),
    ("rewards", lambda a: a.__setitem__(2, np.nan), "rewards: must be finite"),
    ("behaviour_logprobs", lambda a: a.__setitem__((1, 2), np.nan), "behaviour_logprobs: must be finite"),
    ("behaviour_logprobs", lambda a: a.__setitem__((1, 2), -np.inf), "behaviour_logprobs: must be finite"),
    ("token_versions", lambda a: a.__setitem__((0, 3), -1), "token_versions: must be >= 0 on policy"),
    ("token_versions", lambda a: a.__setitem__((0, 0), -2), "token_versions: must be >= 0 on policy"),
    ("token_versions", lambda a: a.__setitem__((0, 0), 0), "token_versions: must be >= 0 on policy"),
])
def test_each_array_invariant_is_checked_naming_the_field(field, edit, message):
    group = make_group(version=2, length=6)
    _through_wire(group)   # valid before the edit
    with pytest.raises(SchemaError, match=message):
        _through_wire(group, **_with(group, field, edit))


def test_a_validated_groups_version_is_its_oldest_policy_token_or_minus_one_if_none():
    group = make_group(version=5)
    group.token_versions[1, 3] = 2   # one token of an older policy
    assert RolloutGroup.from_wire(group.to_wire()).version == 2
    never = make_group(version=5)
    never.loss_mask[:] = 0
    never.token_versions[:] = -1
    never.behaviour_logprobs[:] = 0
    assert RolloutGroup.from_wire(never.to_wire()).version == -1
    empty = _through_wire(make_group(), **{
        name: np.zeros((4, 0), dtype) for name, dtype in
        (("tokens", np.int32), ("loss_mask", np.uint8), ("behaviour_logprobs", np.float32),
         ("token_versions", np.int32))}, lengths=np.zeros(4, np.int32))
    assert empty.version == -1


@pytest.mark.parametrize("field, edit, message", [
    ("lengths", lambda a: a.__setitem__(1, 7), "lengths: each must lie in"),
    ("loss_mask", lambda a: a.__setitem__((0, 3), 2), "loss_mask: values must be 0 or 1"),
    ("rewards", lambda a: a.__setitem__(2, np.nan), "rewards: must be finite"),
    ("behaviour_logprobs", lambda a: a.__setitem__((1, 2), -np.inf), "behaviour_logprobs: must be finite"),
    ("token_versions", lambda a: a.__setitem__((0, 3), -1), "token_versions: must be >= 0 on policy"),
    ("errors", lambda a: a.__setitem__(1, 3), "errors: row 1 must be a string"),
])
def test_groups_checked_together_name_the_bad_one_by_its_index(field, edit, message):
    groups = [make_group(seed=i, version=i, length=6) for i in range(5)]
    bad = groups[3]
    setattr(bad, field, getattr(bad, field).copy())
    edit(getattr(bad, field))
    wire = decode([bytes(f) for f in encode([g.to_wire() for g in groups])])
    with pytest.raises(SchemaError, match=f"group 13: {message}"):
        RolloutGroup.from_wire_all(wire, first=10)
    with pytest.raises(SchemaError, match=f"group 13: {message}"):   # as one batch, checked in chunks of 2
        _through_batch(groups, first=10, most=2)


def _never_and_empty() -> tuple:
    """A group none of whose rows generated, and one of rows with no tokens at all."""
    never = make_group(seed=1)
    never.loss_mask[:] = 0
    never.token_versions[:] = -1
    never.behaviour_logprobs[:] = 0
    empty = dataclasses.replace(make_group(seed=2), **{
        name: np.zeros((4, 0), dtype) for name, dtype in
        (("tokens", np.int32), ("loss_mask", np.uint8), ("behaviour_logprobs", np.float32),
         ("token_versions", np.int32))}, lengths=np.zeros(4, np.int32))
    return never, empty


def test_groups_checked_together_come_out_as_each_alone_with_its_own_version():
    never, empty = _never_and_empty()
    mixed = make_group(seed=3, version=7)
    mixed.token_versions[2, 4] = 5
    groups = [make_group(seed=0, version=2), never, empty, mixed, make_group(seed=4, version=9, group_size=2)]
    wire = decode([bytes(f) for f in encode([g.to_wire() for g in groups])])
    together = RolloutGroup.from_wire_all(wire)
    assert [g.version for g in together] == [2, -1, -1, 5, 9]
    assert [g.version for g in together] == [RolloutGroup.from_wire(w).version for w in wire]
    assert [g.id for g in together] == [g.id for g in groups]


def _through_batch(groups: list, first: int = 0, **chunks) -> list:
    """The groups as one batch, sent and read as the buffer reads an insert."""
    batch = RolloutGroup.batch_to_wire([g.to_wire() for g in groups])
    assert batch is not None
    return RolloutGroup.from_batch(decode([bytes(f) for f in encode(batch)]), first=first, **chunks)


@pytest.mark.parametrize("chunks, betweens", [({}, 0), ({"most": 2}, 2), ({"most_bytes": 1}, 3)])
def test_a_batch_reads_back_as_each_group_read_alone_in_any_chunking(chunks, betweens):
    """Six columns for all the groups: every array, metadata field and version comes back as
    the group's own wire form gives it (the oracle), whatever the chunks they are checked in."""
    never, empty = _never_and_empty()
    mixed = make_group(seed=3, version=7, prompt_id="p", actor_id=3, timings={"generate_s": 1.5})
    mixed.token_versions[2, 4] = 5
    groups = [make_group(seed=0, version=2), never, empty, mixed, make_group(seed=4, version=9, group_size=2, length=9)]
    calls = []
    read = _through_batch(groups, **chunks, between=lambda: calls.append(1))
    alone = [RolloutGroup.from_wire(decode([bytes(f) for f in encode(g.to_wire())])) for g in groups]
    assert [g.version for g in read] == [2, -1, -1, 5, 9] == [g.version for g in alone]
    for got, want in zip(read, alone):
        for field in dataclasses.fields(RolloutGroup):
            a, b = getattr(got, field.name), getattr(want, field.name)
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field.name
            else:
                assert a == b, field.name
    # between two chunks: 1 chunk; 3 of up to 2 groups; one group a chunk, but the empty one (no
    # bytes) shares the next's
    assert len(calls) == betweens


def test_groups_a_batch_does_not_fit_go_one_by_one():
    small = make_group()
    wrong_dtype = dataclasses.replace(make_group(), rewards=make_group().rewards.astype(np.float64))
    wrong_shape = dataclasses.replace(make_group(), lengths=make_group().lengths[:2])
    large = make_group(length=COPY_BELOW // 8)   # its arrays are sent as they are (zero-copy), not copied into columns
    flat = dataclasses.replace(make_group(), tokens=make_group().tokens.reshape(-1))   # 1-D tokens
    assert "batch" in RolloutGroup.wire_field([small.to_wire(), small.to_wire()])
    for other in (wrong_dtype, wrong_shape, large, flat):
        field = RolloutGroup.wire_field([small.to_wire(), other.to_wire()])
        assert list(field) == ["groups"] and len(field["groups"]) == 2
    assert RolloutGroup.wire_field([]) == {"groups": []}
