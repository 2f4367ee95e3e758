"""SPEC §1: class order, label remapping, phases, memory budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mnemonics_fast.data import Phases, class_order, exemplars_per_class

CIFAR_ORDER_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]


def test_class_order_cifar100_begins_with_the_published_order():
    order = class_order(100)
    assert order[:20] == CIFAR_ORDER_HEAD
    assert sorted(order) == list(range(100))


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_class_order_equals_global_seed_shuffle(n):
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        expected = np.arange(n)
        np.random.shuffle(expected)
    finally:
        np.random.set_state(state)
    assert class_order(n) == expected.tolist()


def test_class_order_seed_is_its_own():
    # The training seed (global RNGs) must not influence the order.
    np.random.seed(0)
    torch.manual_seed(0)
    a = class_order(100)
    np.random.seed(12345)
    torch.manual_seed(12345)
    assert class_order(100) == a
    assert class_order(100, seed=7) != a


def test_trainer_remaps_labels_to_positions_in_the_order(tmp_path):
    from conftest import tiny_config
    from mnemonics_fast.trainer import Trainer

    cfg = tiny_config(tmp_path, seed=5, **{"data.synthetic_classes": 10, "protocol.base_classes": 4,
                                           "protocol.num_phases": 3})
    tr = Trainer(cfg)
    tr.setup()
    tr._log_file.close()
    order = class_order(10, 1993)                # the class-order seed, not the training seed 5
    assert tr.order == order
    assert order != list(range(10))
    position = {c: i for i, c in enumerate(order)}
    expected_train = torch.tensor([position[int(c)] for c in tr.ds.train.labels])
    expected_test = torch.tensor([position[int(c)] for c in tr.ds.test.labels])
    assert torch.equal(tr.y_train, expected_train)
    assert torch.equal(tr.y_test, expected_test)
    # Remapped label 0 is original class order[0], i.e. phase 0 trains on the first classes of the order.
    assert set(tr.ds.train.labels[tr.y_train < 4].tolist()) == set(order[:4])


@pytest.mark.parametrize("num_phases,per_phase", [(5, 10), (10, 5), (25, 2)])
def test_phases_cifar_b50(num_phases, per_phase):
    ph = Phases(100, 50, num_phases)
    assert ph.per_phase == per_phase
    assert len(ph) == num_phases + 1                   # N+1 evaluations
    assert ph.new_classes(0) == range(0, 50)
    seen = list(ph.new_classes(0))
    for p in range(1, num_phases + 1):
        new = ph.new_classes(p)
        assert len(new) == per_phase
        assert new.start == seen[-1] + 1
        seen += list(new)
        assert ph.classes_up_to(p) == 50 + p * per_phase
    assert seen == list(range(100))


def test_phases_imagenet1k_b500():
    ph = Phases(1000, 500, 10)
    assert ph.per_phase == 50
    assert ph.new_classes(10) == range(950, 1000)


@pytest.mark.parametrize("num_classes,base,num_phases,key", [
    (100, 50, 3, "protocol.num_phases"),     # 50 does not split into 3
    (100, 50, 0, "protocol.num_phases"),     # classes left over but no phase for them
    (100, 50, -1, "protocol.num_phases"),
    (100, 0, 5, "protocol.base_classes"),
    (100, 101, 5, "protocol.base_classes"),
])
def test_bad_phase_split_names_the_key(num_classes, base, num_phases, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Phases(num_classes, base, num_phases)


def test_all_classes_in_phase_zero():
    ph = Phases(10, 10, 0)
    assert len(ph) == 1 and ph.per_phase == 0 and ph.new_classes(0) == range(10)


def test_exemplars_per_class_growing_and_fixed():
    for seen in (50, 60, 100):
        assert exemplars_per_class("growing", seen) == 20
    assert exemplars_per_class("growing", 77, per_class=5) == 5
    assert exemplars_per_class("fixed", 50) == 40
    assert exemplars_per_class("fixed", 60) == 33          # 2000 // 60: never over the budget
    assert exemplars_per_class("fixed", 100) == 20
    assert exemplars_per_class("fixed", 1000) == 2
    for seen in range(50, 101, 5):
        assert exemplars_per_class("fixed", seen) * seen <= 2000
    with pytest.raises(ValueError, match="memory.kind"):
        exemplars_per_class("unbounded", 10)


def test_trainer_reports_a_bad_split_as_a_config_error(tmp_path):
    """The split depends on the dataset's class count, known only once the data are loaded: still a ConfigError
    naming the key (the CLI prints it without a traceback)."""
    from conftest import tiny_config
    from mnemonics_fast.config import ConfigError
    from mnemonics_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, **{"protocol.num_phases": 3}))     # 6 classes: 4 left, 3 phases
    with pytest.raises(ConfigError, match=r"protocol\.num_phases"):
        tr.setup()
    tr._log_file.close()
