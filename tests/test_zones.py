"""The zone rule's arithmetic (proxy.zones): exact shares for given healthy counts."""

from __future__ import annotations

from fractions import Fraction as F

from proxy.zones import endpoint_weights, spread_replicas, zone_shares

THREE = {"a": 3, "b": 3, "c": 3}


def test_every_endpoint_healthy_keeps_all_traffic_local() -> None:
    assert zone_shares("a", THREE, THREE) == {"a": 1}


def test_one_of_three_local_healthy_keeps_its_fair_part_and_spills_the_excess_by_capacity() -> None:
    # u[a] = 1/7 of the healthy endpoints, t[a] = 1/3 of the traffic: keep (1/7)/(1/3) = 3/7; the other 4/7
    # go to b and c, whose residual capacities (3/7 - 1/3 each) are equal.
    assert zone_shares("a", {"a": 1, "b": 3, "c": 3}, THREE) == {"a": F(3, 7), "b": F(2, 7), "c": F(2, 7)}


def test_two_of_three_local_healthy() -> None:
    # u[a] = 2/8 < 1/3: keep 3/4, spill 1/4 evenly.
    assert zone_shares("a", {"a": 2, "b": 3, "c": 3}, THREE) == {"a": F(3, 4), "b": F(1, 8), "c": F(1, 8)}


def test_a_zone_without_healthy_endpoints_sends_everything_elsewhere() -> None:
    assert zone_shares("a", {"a": 0, "b": 3, "c": 3}, THREE) == {"b": F(1, 2), "c": F(1, 2)}


def test_spill_goes_in_proportion_to_the_other_zones_healthy_endpoints() -> None:
    # b has twice c's endpoints: residual 4/8 - 4/9 = 2 * (2/8 - 2/9).
    counts = {"a": 3, "b": 4, "c": 2}
    shares = zone_shares("a", {"a": 1, "b": 4, "c": 2}, counts)
    assert shares == {"a": F(9, 21), "b": F(8, 21), "c": F(4, 21)}


def test_another_zone_weakened_leaves_the_local_zone_alone() -> None:
    assert zone_shares("a", {"a": 3, "b": 1, "c": 3}, THREE) == {"a": 1}


def test_a_weakened_zone_gets_no_spill_from_another() -> None:
    # a: 1 of 3, b: 2 of 3 (no residual capacity left: 2/6 = 1/3), c whole: all of a's excess goes to c.
    assert zone_shares("a", {"a": 1, "b": 2, "c": 3}, THREE) == {"a": F(1, 2), "c": F(1, 2)}


def test_no_healthy_endpoint_anywhere_gives_no_share() -> None:
    assert zone_shares("a", {"a": 0, "b": 0}, {"a": 3, "b": 3}) == {}


def test_without_a_proxy_zone_shares_follow_healthy_endpoints() -> None:
    assert zone_shares(None, {"a": 1, "b": 3, "c": 3}, THREE) == {"a": F(1, 7), "b": F(3, 7), "c": F(3, 7)}


def test_a_proxy_zone_the_version_does_not_run_in_is_plain() -> None:
    assert zone_shares("d", {"a": 1, "b": 3}, {"a": 3, "b": 3}) == {"a": F(1, 4), "b": F(3, 4)}


def test_endpoints_of_unknown_zone_count_as_one_more_zone() -> None:
    counts = {"a": 3, "b": 3, "": 2}
    assert zone_shares("a", {"a": 3, "b": 3, "": 2}, counts) == {"a": 1}
    # a at 1 of 3: u[a] = 1/6, t[a] = 3/8: keep 4/9; the rest 5/9 by residual b 3/6 - 3/8, "" 2/6 - 2/8 (3:2).
    assert zone_shares("a", {"a": 1, "b": 3, "": 2}, counts) == {"a": F(4, 9), "b": F(1, 3), "": F(2, 9)}


def test_endpoint_weights_split_a_zone_share_over_its_healthy_endpoints() -> None:
    zones = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    healthy = [True, False, False] + [True] * 6
    # a's survivor 3/7 = 9/21, each of b's and c's 2/7 / 3 = 2/21.
    assert endpoint_weights(zones, healthy, "a") == [9, 0, 0, 2, 2, 2, 2, 2, 2]
    assert endpoint_weights(zones, [True] * 9, "a") == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert endpoint_weights(zones, [False] * 9, "a") == [0] * 9


def test_endpoint_weights_quantise_when_the_denominator_is_too_large() -> None:
    zones = ["a"] * 97 + ["b"] * 89 + ["c"] * 83
    healthy = [i < 13 for i in range(97)] + [True] * 172
    weights = endpoint_weights(zones, healthy, "a")
    assert sum(1 for w in weights if w > 0) == 13 + 172
    share_a = sum(weights[:97]) / sum(weights)
    exact = zone_shares("a", {"a": 13, "b": 89, "c": 83}, {"a": 97, "b": 89, "c": 83})["a"]
    assert abs(share_a - float(exact)) < 1e-3


def test_spread_replicas_evenly_remainder_first() -> None:
    assert spread_replicas(6, ["a", "b", "c"]) == {"a": 2, "b": 2, "c": 2}
    assert spread_replicas(7, ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 2}
    assert spread_replicas(1, ["a", "b"]) == {"a": 1, "b": 0}
    assert spread_replicas(3, []) == {}
