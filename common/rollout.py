"""The rollout group: the buffer's item and the learner's unit of data. Defined once, here.

A group is one prompt and its G sampled completions (GRPO normalises rewards within it).
Per-completion arrays are stored as columns [G, T], T being the longest row of the group, with
rows right-padded by zeros. A row holds the whole episode: prompt tokens, then for each turn
the policy's tokens and (multi-turn) the environment's reply tokens.

Versions: a policy version counts the learner's weight publications (0 = initial weights).
`token_versions` holds, for every policy token, the version of the weights that sampled it
(-1 on prompt, environment and padding tokens): weights can change in the middle of a turn.
A row's `version_first`/`version_last` follow from it (-1 for a row that never generated,
such as an episode whose reset failed); the group's `version` is the oldest version of any
row that generated, and staleness is measured against it.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from common.wire import COPY_BELOW, Frames

# field name -> (dtype, shape in terms of G and T)
ARRAY_FIELDS = {
    "tokens": (np.int32, ("G", "T")),             # token ids; prompt, policy and env tokens
    "loss_mask": (np.uint8, ("G", "T")),          # 1 on policy-sampled tokens, else 0
    "behaviour_logprobs": (np.float32, ("G", "T")),  # log mu(token) on policy tokens, else 0
    "lengths": (np.int32, ("G",)),                # valid tokens in each row
    "rewards": (np.float32, ("G",)),              # total reward of each completion
    "token_versions": (np.int32, ("G", "T")),     # policy version that sampled each token; -1 off policy
}
_ARRAY_SPECS = [(name, np.dtype(dtype), len(shape) == 2) for name, (dtype, shape) in ARRAY_FIELDS.items()]
_NO_VERSION = np.uint32(0xFFFFFFFF)   # -1 seen as uint32: above every version >= 0
_DTYPES = "".join(dtype.str for _, dtype, _ in _ARRAY_SPECS)   # what a group's wire form says when right
_ARRAY_NAMES = [name for name, _, _ in _ARRAY_SPECS]
_ARRAY_DTYPES = [dtype for _, dtype, _ in _ARRAY_SPECS]
_ELEMENT_BYTES = sum(dtype.itemsize for _, dtype, is_2d in _ARRAY_SPECS if is_2d)   # a token's, over the [G, T] arrays


class SchemaError(ValueError):
    """A rollout group does not match the schema; the text names the field."""


def finite(x) -> bool:
    """x is a finite number (int or float, numpy's too; not a bool)."""
    kind = type(x)
    if kind is float or kind is int:   # what msgpack gives: the common case first
        return math.isfinite(x)
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def got(x) -> str:
    return f"got {type(x).__name__} {x!r:.40}"


@dataclass
class RolloutGroup:
    tokens: np.ndarray
    loss_mask: np.ndarray
    behaviour_logprobs: np.ndarray
    lengths: np.ndarray
    rewards: np.ndarray
    token_versions: np.ndarray
    turn_rewards: list          # G lists of floats, one per turn
    errors: list                # G strings; "" where the episode ended cleanly
    prompt_id: str = ""
    actor_id: int = 0
    temperature: float = 1.0    # sampling temperature the behaviour log-probs were taken at
    timings: dict = field(default_factory=dict)  # seconds, e.g. generate_s, env_s
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    @property
    def group_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def version_first(self) -> np.ndarray:
        """[G] the version of each row's first policy token; -1 where a row never generated."""
        masked = np.where(self.loss_mask == 1, self.token_versions, np.iinfo(np.int32).max)
        first = masked.min(axis=1) if masked.size else np.full(self.group_size, -1)
        return np.where(self.generated, first, -1).astype(np.int32)

    @property
    def version_last(self) -> np.ndarray:
        """[G] the version of each row's last policy token; -1 where a row never generated."""
        last = self.token_versions.max(axis=1) if self.token_versions.size else np.full(self.group_size, -1)
        return np.where(self.generated, last, -1).astype(np.int32)

    @property
    def generated(self) -> np.ndarray:
        """[G] bool: the row holds at least one policy token."""
        return self.loss_mask.any(axis=1)

    @cached_property  # the buffer asks at every staleness check; the arrays do not change
    def version(self) -> int:
        """The oldest policy version that generated any token of the group; rows that never
        generated do not count. -1 if no row generated. (validate() sets it in passing.)"""
        versions = self.token_versions   # >= 0 exactly on policy tokens (validate)
        return int(versions.min(initial=np.iinfo(np.int32).max, where=versions >= 0)) if (versions >= 0).any() else -1

    @property
    def flat(self) -> bool:
        """Every completion that generated scored the same reward: GRPO's advantages (taken
        over those rows alone) are all 0, so the group teaches nothing (beyond a KL penalty)."""
        rewards = self.rewards[self.generated]
        return bool(rewards.size == 0 or np.ptp(rewards) == 0)

    @property
    def num_policy_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def validate(self) -> "RolloutGroup":
        """Check dtypes, shapes and invariants; raise SchemaError naming the field."""
        if not isinstance(self.tokens, np.ndarray) or self.tokens.ndim != 2:
            raise SchemaError("tokens: must be a 2-D array [G, T]")
        G, T = self.tokens.shape
        if G < 1:
            raise SchemaError("tokens: a group needs at least one completion")
        for name, dtype, is_2d in _ARRAY_SPECS:
            value = getattr(self, name)
            if not isinstance(value, np.ndarray):
                raise SchemaError(f"{name}: must be a numpy array, got {type(value).__name__}")
            if value.dtype is not dtype and value.dtype != dtype:
                raise SchemaError(f"{name}: dtype must be {dtype}, got {value.dtype}")
            if value.shape != ((G, T) if is_2d else (G,)):
                raise SchemaError(f"{name}: shape must be {(G, T) if is_2d else (G,)} (G, T), got {value.shape}")
        self._check_values()
        self._check_metadata()
        return self

    def _check_values(self) -> None:
        """The arrays' invariants (shapes and dtypes are right); sets the version in passing."""
        T = self.tokens.shape[1]
        # Each check is one or two passes over its array, with no temporaries where a view
        # does: a small group's arrays are so short that every numpy call costs more than its
        # data, and a large group's several MB are read once each, not four times.
        if self.lengths.view(np.uint32).max(initial=0) > T:   # a negative length, as uint32, exceeds any T
            raise SchemaError("lengths: each must lie in [0, T]")
        if not np.isfinite(self.rewards).all():
            raise SchemaError("rewards: must be finite")
        if T == 0:
            self.__dict__["version"] = -1
        else:
            if self.loss_mask.max() > 1:
                raise SchemaError("loss_mask: values must be 0 or 1")
            logprobs = self.behaviour_logprobs
            # NaN fails both comparisons (min and max propagate it); -inf fails the second
            if not (logprobs.max() <= 1e-4 and logprobs.min() > -np.inf):
                raise SchemaError("behaviour_logprobs: must be finite and <= 0")
            # policy tokens (mask 1) carry a version >= 0, all others -1: the tokens with a
            # negative version are exactly those off policy, and none is below -1
            versions = self.token_versions
            off_policy = versions < 0
            if versions.min() < -1 or not np.not_equal(off_policy, self.loss_mask.view(np.bool_)).all():
                raise SchemaError("token_versions: must be >= 0 on policy tokens and -1 elsewhere")
            # so the oldest policy version is the smallest as uint32 (-1 becomes the largest)
            oldest = versions.view(np.uint32).min()
            self.__dict__["version"] = -1 if oldest == _NO_VERSION else int(oldest)   # cached_property's slot

    def _check_metadata(self) -> None:
        G = self.tokens.shape[0]
        for name in ("turn_rewards", "errors"):
            if not isinstance(getattr(self, name), list) or len(getattr(self, name)) != G:
                raise SchemaError(f"{name}: must be a list of {G} entries")
        # The metadata is checked whole too: a bad id (unhashable, say) must fail here, before
        # a buffer stores any group of the request.
        if not (isinstance(self.id, str) and self.id):
            raise SchemaError(f"id: must be a non-empty string, {got(self.id)}")
        if not isinstance(self.prompt_id, str):
            raise SchemaError(f"prompt_id: must be a string, {got(self.prompt_id)}")
        if not isinstance(self.actor_id, (int, np.integer)) or isinstance(self.actor_id, bool):
            raise SchemaError(f"actor_id: must be an integer, {got(self.actor_id)}")
        if not (finite(self.temperature) and self.temperature > 0):
            raise SchemaError(f"temperature: must be a finite number > 0, {got(self.temperature)}")
        if not (isinstance(self.timings, dict)
                and all(isinstance(k, str) and finite(v) for k, v in self.timings.items())):
            raise SchemaError(f"timings: must map names to finite numbers (seconds), {got(self.timings)}")
        for i, row in enumerate(self.turn_rewards):
            if not (isinstance(row, list) and all(map(finite, row))):
                raise SchemaError(f"turn_rewards: row {i} must be a list of finite numbers, {got(row)}")
        for i, error in enumerate(self.errors):
            if not isinstance(error, str):
                raise SchemaError(f"errors: row {i} must be a string, {got(error)}")
        if not finite(self.created_at):
            raise SchemaError(f"created_at: must be a finite number (seconds), {got(self.created_at)}")

    def to_wire(self) -> list:
        """The group as the wire carries it: [[G, T], the arrays' dtypes (their numpy `str`s
        joined), the arrays as one run of raw frames in ARRAY_FIELDS order, then the other
        fields in the dataclass's order]. One reference and no keys: a small group's header
        costs a fraction of a map per array (the reader knows every shape from G and T)."""
        arrays = [getattr(self, name) for name in _ARRAY_NAMES]
        try:   # a validated group's arrays have the schema's dtypes: say so without asking each
            dtypes = _DTYPES if all(a.dtype == dt for a, dt in zip(arrays, _ARRAY_DTYPES)) else None
        except AttributeError:   # not arrays yet
            dtypes = None
        return [list(np.shape(self.tokens)), dtypes or "".join(np.asarray(a).dtype.str for a in arrays),
                Frames(arrays), *[getattr(self, name) for name in _META_NAMES]]

    @classmethod
    def from_wire(cls, data) -> "RolloutGroup":
        """A validated group from its wire form (to_wire's; a map of fields, as checkpoints of
        older versions hold, is read too). SchemaError names the field that is wrong."""
        if type(data) is dict:
            return cls._from_fields(data)
        return cls._build(data).checked()

    @classmethod
    def from_wire_all(cls, items: list, first: int = 0) -> list:
        """from_wire of every item, with the array checks of small groups made once over all of
        them together: a 4 KiB group's arrays are so short that each numpy call costs more than
        its data (a 17-group insert of 4 KiB groups: 17 µs a group against 31, cpu2, quiet). SchemaError names
        the first bad group by its index, counted from `first`, and the field."""
        if any(type(data) is dict for data in items):
            return [cls._named(first + k, cls.from_wire, data) for k, data in enumerate(items)]
        groups = [cls._named(first + k, cls._build, data) for k, data in enumerate(items)]
        if not (len(groups) > 1 and sum(g.tokens.size for g in groups) <= _TOGETHER_MAX and _values_ok(groups)):
            for k, group in enumerate(groups):   # each alone: large groups, or to name the bad one
                cls._named(first + k, group._check_values)
        for k, group in enumerate(groups):
            cls._named(first + k, group._check_metadata)
        return groups

    @staticmethod
    def batch_to_wire(wires: list) -> list | None:
        """Several groups, given as their to_wire() forms, as one wire form, as inserts carry
        them: [[G0, T0, G1, T1, ...], the arrays' dtypes, one run of six columns (each field of
        every group, flattened and concatenated in order), [each group's other fields, in the
        dataclass's order]]. Six arrays for any number of groups: encoding and checking them
        cost a few numpy calls a request, not a few a group (128 groups of 4 KiB, cpu2: 9 -> 5 µs
        a group to encode, 18 -> 9 to decode and check). None, to send them one by one, if a
        group's arrays are not the schema's dtypes and shapes (so that the reader names what
        is wrong), or hold COPY_BELOW bytes or more: the wire sends such a group's arrays as
        they are (zero-copy), where a batch would copy them into its columns."""
        shapes, arrays, metas = [], [], []
        for wire in wires:
            if len(wire[0]) != 2 or wire[1] != _DTYPES:   # tokens not 2-D, or dtypes not the schema's
                return None
            (G, T), frames = wire[0], wire[2]
            size = 0
            for (_, _, is_2d), a in zip(_ARRAY_SPECS, frames.items):
                if type(a) is not np.ndarray or a.shape != ((G, T) if is_2d else (G,)):
                    return None
                size += a.nbytes
            if size >= COPY_BELOW:
                return None
            shapes += (G, T)
            arrays.append(frames.items)
            metas.append(wire[3:])
        if len(arrays) == 1:
            columns = [a.reshape(-1) for a in arrays[0]]
        else:
            columns = [np.concatenate([group[i].reshape(-1) for group in arrays]) for i in range(len(_ARRAY_SPECS))]
        return [shapes, _DTYPES, Frames(columns), metas]

    @classmethod
    def wire_field(cls, wires: list) -> dict:
        """Groups (their to_wire() forms) as a message carries them: {"batch": one batch} (six
        columns for all: batch_to_wire), or {"groups": the forms one by one} where a batch
        does not fit them."""
        batch = cls.batch_to_wire(wires) if wires else None
        return {"batch": batch} if batch is not None else {"groups": wires}

    @classmethod
    def from_field(cls, message: dict) -> list:
        """The validated groups of a message made with wire_field; SchemaError names the first
        bad one."""
        return cls.from_batch(message["batch"]) if "batch" in message else cls.from_wire_all(message["groups"])

    @classmethod
    def from_batch(cls, data, first: int = 0, between=None, most: int = 32, most_bytes: int = 1 << 19) -> list:
        """The validated groups of a batch_to_wire form. The values are checked over the columns
        of up to `most` groups (or `most_bytes` of arrays) at a time, `between` called between
        two such chunks (a server reads its control port there). SchemaError names the first
        bad group by its index, counted from `first`, and the field."""
        shapes, columns, metas = cls._batch_parts(data)
        bounds = _batch_bounds(shapes)
        groups = []
        for k, end in chunks([(b - a) * _ELEMENT_BYTES for a, b, _, _ in bounds], most, most_bytes):
            if k and between is not None:
                between()
            (a, _, r, _), (_, b, _, rb) = bounds[k], bounds[end - 1]
            oldest = _columns_ok(shapes[2 * k:2 * end], columns[3][r:rb], columns[4][r:rb], columns[1][a:b],
                                 columns[2][a:b], columns[5][a:b])
            for j in range(k, end):
                group = cls._batch_group(shapes, columns, bounds, metas, j)
                if oldest is None:
                    cls._named(first + j, group._check_values)
                else:
                    group.__dict__["version"] = oldest[j - k]
                cls._named(first + j, group._check_metadata)
                groups.append(group)
        return groups

    @classmethod
    def batch_unchecked(cls, data) -> list:
        """The groups of a batch_to_wire form, their values and metadata not checked yet (each
        is then checked alone: `checked`); SchemaError if the batch itself is malformed."""
        shapes, columns, metas = cls._batch_parts(data)
        bounds = _batch_bounds(shapes)
        return [cls._batch_group(shapes, columns, bounds, metas, j) for j in range(len(metas))]

    def checked(self) -> "RolloutGroup":
        """This group, its values and metadata checked (a group built unchecked)."""
        self._check_values()
        self._check_metadata()
        return self

    @classmethod
    def _batch_parts(cls, data) -> tuple:
        """(shapes, the six columns as arrays, metas) of a batch, its structure checked."""
        if type(data) is not list or len(data) != 4:
            raise SchemaError(f"a batch of rollout groups must be [shapes, dtypes, columns, metas], {got(data)}")
        shapes, dtypes, frames, metas = data
        if type(metas) is not list or not metas or not all(type(m) is list and len(m) == len(_META_NAMES)
                                                           for m in metas):
            raise SchemaError(f"a batch's metas must be a non-empty list of [{', '.join(_META_NAMES)}], {got(metas)}")
        if not (type(shapes) is list and len(shapes) == 2 * len(metas)
                and all(type(v) is int and v >= 0 for v in shapes) and all(shapes[0::2])):
            raise SchemaError(f"a batch's shapes must be [G, T] of each of its {len(metas)} groups, "
                              f"each G >= 1 and T >= 0, {got(shapes)}")
        if type(frames) is not Frames or len(frames.items) != len(_ARRAY_SPECS):
            what = f"got {len(frames.items)}" if type(frames) is Frames else got(frames)
            raise SchemaError(f"a batch carries its {len(_ARRAY_SPECS)} columns as one run of frames, {what}")
        if dtypes != _DTYPES:
            cls._dtype_error(dtypes)
        elements, rows = sum(G * T for G, T in zip(shapes[0::2], shapes[1::2])), sum(shapes[0::2])
        columns = []
        for (name, dtype, is_2d), frame in zip(_ARRAY_SPECS, frames.items):
            count = elements if is_2d else rows
            if frame.nbytes != dtype.itemsize * count:
                raise SchemaError(f"{name}: the batch's column must hold {count} values of {dtype}; its frame holds "
                                  f"{frame.nbytes} bytes")
            columns.append(np.frombuffer(frame, dtype))
        return shapes, columns, metas

    @classmethod
    def _batch_group(cls, shapes, columns, bounds, metas, j) -> "RolloutGroup":
        G, T = shapes[2 * j], shapes[2 * j + 1]
        a, b, r, rb = bounds[j]
        tokens, mask, logprobs, lengths, rewards, versions = columns
        return cls(tokens[a:b].reshape(G, T), mask[a:b].reshape(G, T), logprobs[a:b].reshape(G, T),
                   lengths[r:rb], rewards[r:rb], versions[a:b].reshape(G, T), *metas[j])

    @staticmethod
    def _named(index: int, check, *args):
        try:
            return check(*args)
        except SchemaError as e:
            raise SchemaError(f"group {index}: {e}") from None

    @classmethod
    def _build(cls, data) -> "RolloutGroup":
        """The group of a wire form (to_wire's), its arrays of the schema's dtypes and shapes;
        the values are not checked yet."""
        if type(data) is not list or len(data) != 3 + len(_META_NAMES):
            raise SchemaError(f"a rollout group must be [[G, T], dtypes, arrays, {', '.join(_META_NAMES)}], "
                              f"{got(data)}")
        shape, dtypes, frames = data[0], data[1], data[2]
        if not (type(shape) is list and len(shape) == 2 and all(type(n) is int and n >= 0 for n in shape)):
            raise SchemaError(f"tokens: must be a 2-D array [G, T], its shape {got(shape)}")
        if shape[0] < 1:
            raise SchemaError("tokens: a group needs at least one completion")
        if type(frames) is not Frames or len(frames.items) != len(_ARRAY_SPECS):
            raise SchemaError(f"a rollout group carries its {len(_ARRAY_SPECS)} arrays as one run of frames, {got(frames)}")
        if dtypes != _DTYPES:
            cls._dtype_error(dtypes)
        G, T = shape
        arrays = []
        for (name, dtype, is_2d), frame in zip(_ARRAY_SPECS, frames.items):
            want = (G, T) if is_2d else (G,)
            if frame.nbytes != dtype.itemsize * (G * T if is_2d else G):
                raise SchemaError(f"{name}: shape must be {want} (G, T) of {dtype}; its frame holds {frame.nbytes} bytes")
            arrays.append(np.ndarray(want, dtype, frame))
        return cls(*arrays, *data[3:])

    @staticmethod
    def _dtype_error(dtypes) -> None:
        """SchemaError naming the first array whose dtype is not the schema's."""
        if type(dtypes) is str:
            for name, dtype, _ in _ARRAY_SPECS:
                if not dtypes.startswith(dtype.str):
                    raise SchemaError(f"{name}: dtype must be {dtype}, got {dtypes[:3]!r}")
                dtypes = dtypes[len(dtype.str):]
        raise SchemaError(f"the arrays' dtypes must be {_DTYPES!r}, {got(dtypes)}")

    @classmethod
    def _from_fields(cls, data: dict) -> "RolloutGroup":
        if not (data.keys() <= _FIELD_NAMES and data.keys() >= ARRAY_FIELDS.keys()):
            unknown, missing = set(data) - _FIELD_NAMES, set(ARRAY_FIELDS) - set(data)
            raise SchemaError(f"unknown fields {sorted(unknown, key=str)}, missing fields {sorted(missing)}")
        try:
            group = cls(**data)
        except TypeError as e:
            raise SchemaError(str(e)) from None
        return group.validate()

    @classmethod
    def from_rows(cls, rows: list, **meta) -> "RolloutGroup":
        """Build a group from G rows, each a dict with 1-D `tokens`, `loss_mask`,
        `behaviour_logprobs`, `token_versions` (-1 off policy), the scalar `reward`, plus
        `turn_rewards` (list) and `error` (str)."""
        width = max(len(r["tokens"]) for r in rows)

        def pad(key, dtype, fill=0):
            out = np.full((len(rows), width), fill, dtype=dtype)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = r[key]
            return out

        return cls(
            tokens=pad("tokens", np.int32),
            loss_mask=pad("loss_mask", np.uint8),
            behaviour_logprobs=pad("behaviour_logprobs", np.float32),
            lengths=np.array([len(r["tokens"]) for r in rows], dtype=np.int32),
            rewards=np.array([r["reward"] for r in rows], dtype=np.float32),
            token_versions=pad("token_versions", np.int32, fill=-1),
            turn_rewards=[list(map(float, r["turn_rewards"])) for r in rows],
            errors=[str(r["error"]) for r in rows],
            **meta,
        ).validate()


_FIELD_NAMES = dict.fromkeys(f.name for f in dataclasses.fields(RolloutGroup)).keys()   # ordered, a set view
_META_NAMES = [name for name in _FIELD_NAMES if name not in ARRAY_FIELDS]   # the wire form's order
_TOGETHER_MAX = 1 << 16   # tokens: groups checked together only while smaller (concatenating copies)


def _values_ok(groups: list) -> bool:
    """_check_values of every group at once, over their arrays concatenated; True if all pass
    (each group's version is then set), False if any fails (each is then checked alone, which
    names it). The shapes and dtypes are the schema's (RolloutGroup._build)."""
    def joined(name):
        return np.concatenate([getattr(g, name) for g in groups], axis=None)
    shapes = [n for g in groups for n in g.tokens.shape]
    oldest = _columns_ok(shapes, joined("lengths"), joined("rewards"), joined("loss_mask"),
                         joined("behaviour_logprobs"), joined("token_versions"))
    if oldest is None:
        return False
    for group, value in zip(groups, oldest):
        group.__dict__["version"] = value
    return True


def chunks(sizes: list, most: int, most_bytes: int):
    """(start, end) of consecutive runs of groups whose arrays hold `sizes` bytes: each of `most`
    groups at most, or fewer once they hold `most_bytes` (a run has one group at least), so
    that a reader checking them together can do something else between two runs."""
    start = 0
    while start < len(sizes):
        end, size = start + 1, sizes[start]
        while end < len(sizes) and end - start < most and size < most_bytes:
            size += sizes[end]
            end += 1
        yield start, end
        start = end


def _batch_bounds(shapes: list) -> list:
    """Per group of a batch: (first, end) of its elements in the [G, T] columns, then (first,
    end) of its rows in the [G] ones."""
    bounds, a, r = [], 0, 0
    for G, T in zip(shapes[0::2], shapes[1::2]):
        bounds.append((a, a + G * T, r, r + G))
        a, r = a + G * T, r + G
    return bounds


def _columns_ok(shapes: list, lengths, rewards, mask, logprobs, versions) -> list | None:
    """The array checks of consecutive groups over their columns (each field of every group,
    flattened and concatenated; `shapes` [G0, T0, G1, T1, ...]): each group's version (-1 where
    none generated) if every value is valid, else None."""
    Gs, Ts = shapes[0::2], shapes[1::2]
    if (lengths.view(np.uint32) > np.repeat(Ts, Gs)).any():
        return None
    if not np.isfinite(rewards).all():
        return None
    if mask.size:
        if not (mask.max() <= 1 and logprobs.max() <= 1e-4 and logprobs.min() > -np.inf):
            return None
        if versions.min() < -1 or not np.not_equal(versions < 0, mask.view(np.bool_)).all():
            return None
    # each group's version: the smallest of its token versions as uint32 (-1 is the largest)
    sizes = [G * T for G, T in zip(Gs, Ts)]
    held = [k for k, n in enumerate(sizes) if n]   # reduceat needs no empty segment
    starts = np.cumsum([0] + sizes[:-1])
    oldest = [-1] * len(sizes)
    if held:
        for k, value in zip(held, np.minimum.reduceat(versions.view(np.uint32), starts[held]).tolist()):
            oldest[k] = -1 if value == _NO_VERSION else value
    return oldest
