"""Many binary trees in one set of node arrays: the leaf each tree puts a row of features on.

A forest's spec (``serving.compiled_spec``) holds every node of every tree in the same arrays,
``feature``, ``threshold``, ``left`` and ``right`` (a leaf's children are itself), with each
tree's root. Both libraries test float32 features: scikit-learn against float64 thresholds,
``x <= threshold`` going left; XGBoost against float32 ones, ``x < threshold`` going left.
``Forest`` finds the leaves two ways, which give the same leaves:

- ``leaves``, for rows of a matrix: every node's test decided at once, then every tree stepping
  from its root to its next node, as many times as the deepest tree has levels. Each step is
  one NumPy call whatever the number of rows, so a batch costs little more than its tests.
- ``values_of_one``, for one row, where those 20-odd NumPy calls over every node would be most
  of a prediction; it gives the leaves' values. QuickScorer (Lucchese et al., "QuickScorer: a
  fast algorithm to rank documents with additive ensembles of regression trees", SIGIR 2015):
  number each tree's leaves from left to right. A node whose test sends the row right rules out
  the leaves of its left subtree, and the leaf the row reaches is the leftmost one that no such
  node rules out. The nodes testing one feature, in the order of their thresholds, send a row
  right for a prefix of that order, found by bisection; ``_Tables`` holds, for every prefix,
  each tree's leaves not ruled out by it, as a bit mask. One row is then a bisection per
  feature, one table row per feature ANDed together, and each tree's lowest set bit (for trees
  of 8 leaves or fewer, whose masks are bytes, ``bytes.translate`` looks it up).

The tables are built only for trees of at most 64 leaves whose tables fit ``MAX_TABLE_BYTES``
(they take a byte per tree or more for every node); otherwise one row is walked like a batch.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_TABLE_BYTES = 16 * 1024 * 1024
"""The largest QuickScorer table of masks, and of leaf values by byte, built for one forest (its
building takes about three times as much for a moment)."""
_MASK_TYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


class Forest:
    ROWS_AT_ONCE = 64
    """Rows per block of a batch: a block's tests (rows x nodes) stay a few megabytes."""

    def __init__(self, trees: Mapping[str, Any], values: np.ndarray, *,
                 equal_goes_right: bool) -> None:
        """``trees``: a spec's ``estimator.trees``, as ``compiled_spec.validate`` passed it (a
        forest, so ``depth`` steps take every root to its leaf); ``values``: what a leaf gives,
        the nodes on the last axis (for ``values_of_one``); ``equal_goes_right``: a feature
        equal to the threshold goes right (XGBoost), not left (scikit-learn)."""
        self._feature = trees["feature"].astype(np.intp)
        self._threshold = trees["threshold"]
        self._left = trees["left"].astype(np.intp)
        self._right = trees["right"].astype(np.intp)
        self._roots = trees["roots"].astype(np.intp)
        self._depth: int = trees["depth"]
        self._equal_goes_right = equal_goes_right
        self._values = values
        self._tables = _Tables.build(self._feature, self._threshold, self._left, self._right,
                                     self._roots, values, equal_goes_right=equal_goes_right)

    @property
    def one_row_path(self) -> str:
        """How ``values_of_one`` finds the leaves: "walk", "tables" or "tables of bytes"."""
        if self._tables is None:
            return "walk"
        return "tables of bytes" if self._tables.of_bytes else "tables"

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """The leaf each tree puts each row of ``x`` (float64) on, shape ``(rows, trees)``."""
        if len(x) <= self.ROWS_AT_ONCE:
            return self._leaves(x)
        return np.concatenate([self._leaves(x[start:start + self.ROWS_AT_ONCE])
                               for start in range(0, len(x), self.ROWS_AT_ONCE)])

    def values_of_one(self, vector: list[float]) -> np.ndarray:
        """``values`` of the leaf each tree puts the row ``vector`` on, the trees on the last
        axis."""
        if self._tables is None:
            return self._values.take(self._leaves(np.array([vector]))[0], axis=-1)
        return self._tables.values(array.array("f", vector).tolist())  # Rounded to float32.

    def _leaves(self, x: np.ndarray) -> np.ndarray:
        values = x.astype(np.float32).take(self._feature, axis=1)
        right = values >= self._threshold if self._equal_goes_right else values > self._threshold
        following = np.where(right, self._right, self._left)
        # Row r's nodes, flattened, start at r * nodes.
        nodes = len(self._feature)
        first = np.arange(0, len(x) * nodes, nodes, dtype=np.intp)[:, None]
        following = (following + first).ravel()
        at = self._roots + first
        for _ in range(self._depth):
            at = following.take(at)
        return at - first


class _Tables:
    """QuickScorer's tables of a forest (see the module docstring)."""

    def __init__(self, plan: list[tuple[int, int, list[float]]], masks: np.ndarray,
                 leaf_values: np.ndarray, tree_start: np.ndarray, of_bytes: bool,
                 equal_goes_right: bool) -> None:
        """Use ``build``."""
        self._plan = plan
        """Per feature tested: its index, its first row in ``masks``, its sorted thresholds."""
        # ``masks`` holds rows of a bit mask per tree (bit i: the tree's leaf i from the left is
        # not ruled out). Each row is kept as one Python int: ANDing a few of those costs less
        # than NumPy's take and reduce, whose set-up is more than the work on a few hundred bytes.
        self._row_type = masks.dtype.newbyteorder("<")
        self._rows = [int.from_bytes(row.astype(self._row_type).tobytes(), "little")
                      for row in masks]
        self._row_bytes = masks.shape[1] * masks.itemsize
        self._leaf_values = leaf_values
        """The values of every tree's leaves, left to right, tree after tree (last axis)."""
        self._tree_start = tree_start
        """Per tree, where its leaves start in ``leaf_values``."""
        self.of_bytes = of_bytes
        """One byte per tree's mask, whose lowest set bit ``bytes.translate`` finds."""
        # A threshold the value is above (scikit-learn), or not below (XGBoost), sends it right.
        self._sent_right = bisect.bisect_right if equal_goes_right else bisect.bisect_left

    @classmethod
    def build(cls, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray,
              right: np.ndarray, roots: np.ndarray, values: np.ndarray, *,
              equal_goes_right: bool) -> _Tables | None:
        """The tables, or None if these trees do not make small enough ones."""
        node = np.arange(len(left))
        leaf, inner = (left == node) & (right == node), (left != node) & (right != node)
        if not (leaf | inner).all():
            return None  # A node that is its own child on one side only: walked as it is.
        tests_anywhere = int(inner.sum())
        if tests_anywhere > 63 * len(roots):
            return None  # A tree has more than 64 leaves (one of L leaves has L - 1 tests).
        if (tests_anywhere + len(np.unique(feature))) * len(roots) > MAX_TABLE_BYTES:
            return None  # Too large even at a byte per tree; not worth ordering the leaves.
        leaf_nodes, tests, starts = _in_order(left.tolist(), right.tolist(), roots.tolist())
        if not tests:
            return None  # Every tree is a single leaf: the walk takes no step at all.
        most_leaves = int(np.diff([*starts, len(leaf_nodes)]).max())
        mask_type = next((t for t in _MASK_TYPES if np.iinfo(t).bits >= most_leaves), None)
        if mask_type is None:
            return None
        tested, tree, first, last = np.array(tests, dtype=np.intp).T
        features_tested = np.unique(feature[tested]).tolist()
        row_bytes = len(roots) * np.dtype(mask_type).itemsize
        if (len(tests) + len(features_tested)) * row_bytes > MAX_TABLE_BYTES:
            return None
        if len(features_tested) * row_bytes > 8 * len(left):
            return None  # One row would AND more bytes than the walk reads a node's index in.
        ordered = np.lexsort((threshold[tested], feature[tested]))
        everything = (1 << np.iinfo(mask_type).bits) - 1
        plan, blocks, row = [], [], 0
        for f in features_tested:
            here = ordered[feature[tested[ordered]] == f]
            # Row k of the block: the feature's first k nodes (by threshold) sent the row right,
            # each ruling out its left subtree's leaves, first to last - 1.
            block = np.full((len(here) + 1, len(roots)), everything, dtype=mask_type)
            block[np.arange(1, len(here) + 1), tree[here]] = [
                everything ^ ((1 << hi) - (1 << lo)) for lo, hi in zip(
                    first[here].tolist(), last[here].tolist(), strict=True)]
            blocks.append(np.bitwise_and.accumulate(block, axis=0))
            plan.append((f, row, threshold[tested[here]].tolist()))
            row += len(here) + 1
        tree_start = np.array(starts, dtype=np.intp)
        of_bytes = mask_type is np.uint8 and (
            values.nbytes // values.shape[-1] * 8 * len(roots) <= MAX_TABLE_BYTES)
        if of_bytes:
            # Tree t's leaf i at 8 t + i (a tree of fewer leaves repeats its last one there),
            # where a byte's lowest set bit points.
            leaves = np.diff([*starts, len(leaf_nodes)])
            leaf_nodes = np.array(leaf_nodes)[
                tree_start[:, None] + np.minimum(np.arange(8), leaves[:, None] - 1)].ravel()
            tree_start = np.arange(len(roots), dtype=np.intp) * 8
        return cls(plan, np.concatenate(blocks), values.take(leaf_nodes, axis=-1), tree_start,
                   of_bytes, equal_goes_right)

    def values(self, features: list[float]) -> np.ndarray:
        """``features``: the row's, float32 values as Python floats."""
        sent_right = self._sent_right
        table = self._rows
        combined = -1
        for f, start, thresholds in self._plan:
            combined &= table[start + sent_right(thresholds, features[f])]
        masks = combined.to_bytes(self._row_bytes, "little")
        if self.of_bytes:
            leaves = np.frombuffer(masks.translate(_LOWEST_SET_BIT_OF_BYTE), np.uint8)
        else:
            words = np.frombuffer(masks, self._row_type)
            # The lowest set bit, alone, is 2^i; less one, it has i bits set.
            leaves = np.bitwise_count((words & -words) - 1)
        return self._leaf_values.take(self._tree_start + leaves, axis=-1)


_LOWEST_SET_BIT_OF_BYTE = bytes(max(0, (b & -b).bit_length() - 1) for b in range(256))
"""For ``bytes.translate``: a byte's lowest set bit (0 for 0, which no mask is)."""


def _in_order(left: list[int], right: list[int], roots: list[int]
              ) -> tuple[list[int], list[tuple[int, int, int, int]], list[int]]:
    """Every tree's leaves from left to right (one list, tree after tree); for every node with
    children, ``(node, tree, first, last)``: its left subtree's leaves are the tree's leaves
    ``first`` to ``last - 1``; and where each tree's leaves start. The trees form a forest
    (``compiled_spec.forest_depth`` checked it), so this ends."""
    leaves: list[int] = []
    tests: list[tuple[int, int, int, int]] = []
    starts: list[int] = []
    for tree, root in enumerate(roots):
        start = len(leaves)
        starts.append(start)
        first: dict[int, int] = {}
        pending = [root]
        while pending:
            node = pending.pop()
            if node < 0:  # ~node's left subtree is done.
                node = ~node
                tests.append((node, tree, first.pop(node), len(leaves) - start))
            elif left[node] == node:
                leaves.append(node)
            else:
                first[node] = len(leaves) - start
                pending += (right[node], ~node, left[node])
    return leaves, tests, starts
