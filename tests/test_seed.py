"""The seed series' published figures, as printed beside the model's."""

from __future__ import annotations

import pytest

from ptebatch import cost, seed
from ptebatch.study import fork_study, format_fork_study

#: The changes the cover letters print next to their times, rounded to whole percent: the
#: transcribed times must reproduce them.
PUBLISHED_FORK = {"4K": -2, "16K": -16, "32K": -24, "64K": -26, "128K": -28, "256K": -29, "512K": -30,
                  "1M": -30, "2M": -30}
PUBLISHED_MUNMAP = {"4K": -1, "16K": -20, "32K": -31, "64K": -37, "128K": -47, "256K": -53, "512K": -56,
                    "1M": -57, "2M": -58}


@pytest.mark.parametrize("op, published", [("fork", PUBLISHED_FORK), ("munmap", PUBLISHED_MUNMAP)])
def test_transcribed_times_give_the_published_changes(op, published) -> None:
    for size, pct in published.items():
        c = seed.change(op, size)
        assert c is not None and round(c * 100) == pct, (op, size, c)
    assert seed.change(op, "2M-pte") == seed.change(op, "2M")
    assert seed.change(op, "2M-pmd") is None
    assert seed.ratio_to_4k(op, "4K") == 1.0


def test_held_out_table_shows_the_seed_beside_fork_and_the_parents_munmap() -> None:
    _, rows = cost.held_out()
    text = cost.format_held_out(rows)
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n\n")}
    fork = next(v for k, v in sections.items() if k.startswith("== fork"))
    assert "seed /4K" in fork
    line = next(ln for ln in fork.splitlines() if ln.split()[0] == "2M-pte")
    assert line.split()[-2:] == [f"{seed.ratio_to_4k('fork', '2M'):.2f}", "-30%"]
    exit_ = next(v for k, v in sections.items() if k.startswith("== child-exit"))
    assert "seed" not in exit_.splitlines()[1]


def test_demo_table_shows_the_seeds_fork_before_and_with_the_series() -> None:
    kernels = ["6.8", "6.18"]
    rows = fork_study(64 << 20, [4096, 2 << 20], kernels, "x86-64")
    predicted = {(r.key, r.kernel): 1e6 for r in rows}
    lines = format_fork_study(rows, kernels, predicted).splitlines()
    assert "seed ms/GiB+" in lines[0]
    two_m = [ln.split() for ln in lines if ln.split()[0] == "2M"]
    assert two_m[0][-2:] == ["14.30", "1.00x"]  # 6.8: before the series
    assert two_m[1][-2:] == ["10.08", "0.72x"]  # 6.18: with it
    ratio = lines[lines.index(next(ln for ln in lines if ln.split()[0] == "2M" and "6.18" in ln)) + 1]
    assert ratio.split()[-1] == f"{0.014305 / 0.010076:.2f}x"
