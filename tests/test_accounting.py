"""Privacy accounting: Opacus's reference value, cumulative composition across rounds, exact restore."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from common.accounting import PrivacyLedger, compose_epsilon, noise_multiplier_for

SIGMA, Q, STEPS, DELTA = 1.5, 0.04, 2250, 1e-5


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def test_rdp_matches_opacus_reference_value() -> None:
    ledger = PrivacyLedger()

    ledger.record(SIGMA, Q, STEPS)

    assert ledger.epsilon(DELTA) == pytest.approx(7.32911117143, rel=1e-9)  # Opacus's accountants_test.py
    assert ledger.epsilon(DELTA) == pytest.approx(opacus_epsilon([(SIGMA, Q, STEPS)], DELTA), rel=1e-12)


def test_rdp_agrees_with_dp_accounting() -> None:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), STEPS
    )
    independent = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS).compose(event)

    assert compose_epsilon([(SIGMA, Q, STEPS)], DELTA) == pytest.approx(independent.get_epsilon(DELTA), rel=1e-3)


def test_epsilon_is_cumulative_across_rounds() -> None:
    ledger = PrivacyLedger()
    rounds = [(1.1, 0.05, 40), (0.9, 0.02, 60)]

    ledger.record(*rounds[0])
    eps_round_1 = ledger.epsilon(DELTA)
    ledger.record(*rounds[1])
    eps_round_2 = ledger.epsilon(DELTA)

    assert eps_round_2 > eps_round_1 > 0
    assert eps_round_2 == pytest.approx(opacus_epsilon(rounds, DELTA), rel=1e-12)


def test_one_step_at_a_time_equals_one_entry() -> None:
    stepwise, bulk = PrivacyLedger(), PrivacyLedger()

    for _ in range(30):
        stepwise.record(1.0, 0.1)
    bulk.record(1.0, 0.1, 30)

    assert stepwise == bulk and stepwise.steps == 30


def test_json_round_trip_continues_exactly() -> None:
    ledger = PrivacyLedger()
    ledger.record(4.0 / 3.0, 0.1 / 7.0, 17)
    ledger.record(2.7, 0.05, 3)

    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    restored.record(1.2, 0.05, 5)
    ledger.record(1.2, 0.05, 5)

    assert restored == ledger
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)


def test_noise_multiplier_for_meets_the_target() -> None:
    z = noise_multiplier_for(target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=200)

    eps = compose_epsilon([(z, 0.05, 200)], DELTA)

    assert 3.0 - 0.02 < eps <= 3.0


def test_prv_is_tighter_than_rdp() -> None:
    ledger = PrivacyLedger(mechanism="prv", history=[(SIGMA, Q, STEPS)])

    assert 6.0 < ledger.epsilon(DELTA) < compose_epsilon(ledger.history, DELTA, "rdp")


def test_edge_cases() -> None:
    assert PrivacyLedger().epsilon(DELTA) == 0.0
    assert compose_epsilon([(0.0, 0.1, 5)], DELTA) == math.inf
    assert compose_epsilon([(0.0, 0.1, 0)], DELTA) == 0.0


@pytest.mark.parametrize(
    ("entry", "name"),
    [((-1.0, 0.1, 1), "noise_multiplier"), ((1.0, 0.0, 1), "sample_rate"), ((1.0, 0.1, 1.5), "steps")],
)
def test_bad_entries_are_named(entry: tuple[float, float, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PrivacyLedger().record(*entry)  # type: ignore[arg-type]


def test_unknown_format_and_mechanism_are_refused() -> None:
    with pytest.raises(ValueError, match="fedlora-privacy-ledger"):
        PrivacyLedger.from_dict({"history": []})
    with pytest.raises(ValueError, match="unknown accountant"):
        PrivacyLedger(mechanism="gdp-ish")


def test_opacus_is_imported_on_first_use_and_leaves_the_root_logger_alone() -> None:
    """A deployed node starts a process per message: the ClientApp must not pay for Opacus unless DP is on, and
    Opacus's ``logging.basicConfig`` must not add a root handler (every Flower line would print twice)."""
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "import client.client_app, simulations.coordinator_app\n"
        "assert 'opacus' not in sys.modules, 'importing the apps imported opacus'\n"
        "before = list(logging.getLogger().handlers)\n"
        "from common.accounting import compose_epsilon\n"
        "from client.privacy import attach_dp_sgd\n"
        "assert compose_epsilon([(1.0, 0.1, 10)], 1e-5) > 0\n"
        "assert 'opacus' in sys.modules\n"
        "assert logging.getLogger().handlers == before, logging.getLogger().handlers\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
