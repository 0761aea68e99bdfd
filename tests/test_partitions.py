"""How packaged data is split over simulated nodes (`client.tasks.partition_indices`)."""

from __future__ import annotations

from collections import Counter

import pytest

from client.tasks import partition_indices

# Sorted by label, as 20 Newsgroups' .tab file is: 20 labels x 60 rows.
SORTED_LABELS = [label for label in range(20) for _ in range(60)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_data(partitioner: str) -> None:
    parts = partition_indices(SORTED_LABELS, 8, partitioner, seed=0)
    assert len(parts) == 8
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))
    if partitioner != "pathological":  # the pathological split may leave rows of unchosen labels out
        assert sorted(flat) == list(range(len(SORTED_LABELS)))


def test_iid_gives_every_node_every_label_even_when_the_file_is_sorted() -> None:
    for part in partition_indices(SORTED_LABELS, 8, "iid", seed=0):
        counts = Counter(SORTED_LABELS[i] for i in part)
        assert len(counts) == 20, f"an IID node saw only labels {sorted(counts)}"
        assert max(counts.values()) <= 4 * (len(part) / 20)


def test_dirichlet_is_skewed_where_iid_is_not() -> None:
    def largest_label_share(parts: list[list[int]]) -> float:
        return max(max(Counter(SORTED_LABELS[i] for i in p).values()) / len(p) for p in parts)

    assert largest_label_share(partition_indices(SORTED_LABELS, 8, "dirichlet", seed=0, alpha=0.1)) > 0.2
    assert largest_label_share(partition_indices(SORTED_LABELS, 8, "iid", seed=0)) < 0.15


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_the_split_is_seeded(partitioner: str) -> None:
    first = partition_indices(SORTED_LABELS, 4, partitioner, seed=3)
    assert partition_indices(SORTED_LABELS, 4, partitioner, seed=3) == first
    assert partition_indices(SORTED_LABELS, 4, partitioner, seed=4) != first


def test_an_unknown_partitioner_is_named() -> None:
    with pytest.raises(ValueError, match="unknown partitioner 'shards'"):
        partition_indices(SORTED_LABELS, 4, "shards", seed=0)
    with pytest.raises(ValueError, match="num-partitions must be at least 1"):
        partition_indices(SORTED_LABELS, 0, "iid", seed=0)


def test_stratified_indices_keep_every_labels_share_and_repeat() -> None:
    from client.tasks import stratified_indices

    labels = [0] * 600 + [1] * 300 + [2] * 100
    chosen = stratified_indices(labels, 100, seed=3)
    counts = [sum(labels[i] == c for i in chosen) for c in range(3)]
    assert len(chosen) == len(set(chosen)) == 100 and counts == [60, 30, 10]
    assert chosen == stratified_indices(labels, 100, seed=3) != stratified_indices(labels, 100, seed=4)
    assert stratified_indices(labels, 5000, seed=3) == list(range(1000))
    uneven = stratified_indices([0, 0, 0, 1, 1, 2], 4, seed=0)  # exact shares 2, 1.33, 0.67: remainders decide
    assert sorted(labels_of for labels_of in ([0, 0, 0, 1, 1, 2][i] for i in uneven)) == [0, 0, 1, 2]
