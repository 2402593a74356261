"""The numbers of DeepConf's offline evaluation (experiments/deepconf.py: `offline_record` per
problem, `summarize` over problems) on hand-made traces of three problems, every value computed
by hand below.

Settings: window = 2, tail = 2 (tokens), ks = (2, 4), offline_traces = 4. With window 2 a trace
of n tokens has n - 1 windows (one group, its mean, when n < 2); bottom-10% keeps
max(1, floor(0.1 x #windows)) = 1 window for these short traces, so it equals the lowest group.
Filtered votes keep the voters whose score reaches the (100 - eta)-th percentile of the voters'
scores (linear interpolation: position p = (100 - eta)/100 x (n - 1) in the sorted scores) and
vote weighted by the same score. Ties go to the answer with the most confident voter, then to
the answer seen first (a majority vote has no confidence: the answer seen first).
"""

import json
import os
import sys

import numpy as np
import pytest

from jaxlab.deepconf import online

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import deepconf  # experiments/deepconf.py

CFG = deepconf.Config(window=2, tail=2, offline_traces=4, ks=(2, 4), warmup=4, batch=4)

# (reference, [(text, token confidences)]); a trace's length is its number of confidences.
PROBLEMS = {
    # a0: mean 28/4 = 7; windows 2, 6.5, 12: lowest 2; tail (10 + 14)/2 = 12
    # a1, a2: every metric 3;  a3: no answer (does not vote), every metric 8
    "A": ("7", [(r"so \boxed{7}", [1, 3, 10, 14]), (r"\boxed{3}", [3, 3, 3]),
                (r"\boxed{3}", [3, 3, 3]), ("no answer", [8, 8])]),
    # every metric of a trace is its constant confidence: b0 3, b1 6, b2 5, b3 1;
    # "12.0" is the same answer as "12" (one group, correct)
    "B": ("12", [(r"\boxed{12}", [3, 3]), (r"\boxed{5}", [6, 6, 6, 6]),
                 (r"\boxed{12.0}", [5, 5, 5]), (r"\boxed{5}", [1, 1, 1, 1])]),
    # nothing votes: every method answers nothing (wrong); every metric 2
    "C": ("1", [("no box", [2]), ("none", [2]), ("nothing", [2]), ("still nothing", [2])]),
}

METHODS = [name for name, *_ in deepconf.OFFLINE]
# correctness of (majority, weighted-mean, lowest-group@90, lowest-group@10, bottom-10%@10,
# tail@90, tail@10) per problem and K:
EXPECTED_OFFLINE = {
    "A": {
        # K=2, traces a0 "7" (right), a1 "3": pass@1 1/2, tokens 4 + 3 = 7
        # majority: 1-1, the first-seen "7" -> right; weighted-mean: 7 vs 3 -> right
        # lowest [2, 3]: @90 cut 2 + 0.1 x 1 = 2.1, @10 cut 2 + 0.9 x 1 = 2.9: only a1 -> wrong
        # tail [12, 3]: @90 cut 3 + 0.1 x 9 = 3.9, @10 cut 3 + 0.9 x 9 = 11.1: only a0 -> right
        "2": {"pass@1": 0.5, "tokens": 7, "majority": True, "weighted-mean": True,
              "lowest-group@90": False, "lowest-group@10": False, "bottom-10%@10": False,
              "tail@90": True, "tail@10": True},
        # K=4, voters a0, a1, a2: pass@1 1/4, tokens 4 + 3 + 3 + 2 = 12
        # majority: "3" 2 votes to 1 -> wrong; weighted-mean: 7 vs 3 + 3 = 6 -> right
        # lowest sorted [2, 3, 3]: @90 p = 0.2, cut 2.2: a1, a2 -> wrong; @10 p = 1.8, cut 3:
        #   a1, a2 -> wrong
        # tail sorted [3, 3, 12]: @90 cut 3, all: 12 vs 6 -> right; @10 p = 1.8,
        #   cut 3 + 0.8 x 9 = 10.2: a0 -> right
        "4": {"pass@1": 0.25, "tokens": 12, "majority": False, "weighted-mean": True,
              "lowest-group@90": False, "lowest-group@10": False, "bottom-10%@10": False,
              "tail@90": True, "tail@10": True},
    },
    "B": {
        # K=2, b0 "12" (3), b1 "5" (6): pass@1 1/2, tokens 2 + 4 = 6
        # majority: 1-1, the first-seen "12" -> right; weighted: 3 vs 6 -> wrong
        # every filter (cuts 3.3 and 5.7) keeps b1 only -> wrong
        "2": {"pass@1": 0.5, "tokens": 6, "majority": True, "weighted-mean": False,
              "lowest-group@90": False, "lowest-group@10": False, "bottom-10%@10": False,
              "tail@90": False, "tail@10": False},
        # K=4: pass@1 2/4, tokens 2 + 4 + 3 + 4 = 13
        # majority: 2-2, the first-seen "12" -> right; weighted: 3 + 5 = 8 vs 6 + 1 = 7 -> right
        # sorted [1, 3, 5, 6]: @90 p = 0.3, cut 1 + 0.3 x 2 = 1.6: b0, b1, b2: 8 vs 6 -> right;
        #   @10 p = 2.7, cut 5 + 0.7 x 1 = 5.7: b1 -> wrong (lowest, bottom and tail alike)
        "4": {"pass@1": 0.5, "tokens": 13, "majority": True, "weighted-mean": True,
              "lowest-group@90": True, "lowest-group@10": False, "bottom-10%@10": False,
              "tail@90": True, "tail@10": False},
    },
    "C": {
        "2": {"pass@1": 0.0, "tokens": 2, **dict.fromkeys(METHODS, False)},
        "4": {"pass@1": 0.0, "tokens": 4, **dict.fromkeys(METHODS, False)},
    },
}
EXPECTED_TRACES = {
    "A": {"correct": [True, False, False, False], "mean": [7, 3, 3, 8],
          "lowest_group": [2, 3, 3, 8], "bottom_group": [2, 3, 3, 8], "tail": [12, 3, 3, 8]},
    "B": {"correct": [True, False, True, False],
          **{metric: [3, 6, 5, 1] for metric in ("mean", "lowest_group", "bottom_group", "tail")}},
    "C": {"correct": [False] * 4,
          **{metric: [2, 2, 2, 2] for metric in ("mean", "lowest_group", "bottom_group", "tail")}},
}


def traces_of(items) -> online.Traces:
    lengths = np.array([len(c) for _, c in items])
    confidence = np.zeros((len(items), 4), np.float32)
    for row, (_, c) in enumerate(items):
        confidence[row, :len(c)] = c
    return online.Traces(texts=[text for text, _ in items], lengths=lengths,
                         lowest=np.zeros(len(items), np.float32),  # not read offline
                         stopped=np.zeros(len(items), bool), confidence=confidence)


def offline_records() -> dict[str, dict]:
    """Each problem's record as main() stores it (through JSON)."""
    return {name: json.loads(json.dumps(deepconf.offline_record(traces_of(items), reference,
                                                                CFG)))
            for name, (reference, items) in PROBLEMS.items()}


@pytest.fixture(scope="module")
def records():
    return offline_records()


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_offline_record(records, problem):
    record = records[problem]
    assert set(record) == {"2", "4", "traces"}
    for k in ("2", "4"):
        assert record[k] == EXPECTED_OFFLINE[problem][k], k
    assert record["traces"] == EXPECTED_TRACES[problem]


# Online results, made up by hand (the online decoding has its own tests):
# rule -> problem -> (correct, tokens, launched, stopped, seconds)
ONLINE = {"deepconf-low": {"A": (True, 6, 4, 2, 1.0), "B": (False, 5, 3, 1, 0.5),
                           "C": (False, 4, 4, 3, 0.0)},
          "deepconf-high": {"A": (True, 12, 4, 0, 3.0), "B": (True, 13, 4, 0, 2.0),
                            "C": (False, 4, 4, 0, 1.0)}}
OFFLINE_SECONDS = {"A": 4.0, "B": 2.0, "C": 0.0}


def test_summarize(records):
    rows = [{"id": name, "answer": PROBLEMS[name][0], "offline_seconds": OFFLINE_SECONDS[name],
             "offline": records[name],
             "online": {rule: dict(zip(("correct", "tokens", "launched", "stopped", "seconds"),
                                       by_problem[name], strict=True))
                        for rule, by_problem in ONLINE.items()}}
             for name in ("A", "B", "C")]
    summary = deepconf.summarize(rows, CFG)
    assert summary["problems"] == 3
    # Offline: means over A, B, C of the records above.
    expected_offline = {
        # pass@1 (1/2 + 1/2 + 0)/3; tokens (7 + 6 + 2)/3; methods: right in A and/or B
        "2": {"pass@1": 1 / 3, "tokens": 5.0, "majority": 2 / 3, "weighted-mean": 1 / 3,
              "lowest-group@90": 0.0, "lowest-group@10": 0.0, "bottom-10%@10": 0.0,
              "tail@90": 1 / 3, "tail@10": 1 / 3},
        # pass@1 (1/4 + 1/2 + 0)/3 = 1/4; tokens (12 + 13 + 4)/3 = 29/3
        "4": {"pass@1": 0.25, "tokens": 29 / 3, "majority": 1 / 3, "weighted-mean": 2 / 3,
              "lowest-group@90": 1 / 3, "lowest-group@10": 0.0, "bottom-10%@10": 0.0,
              "tail@90": 2 / 3, "tail@10": 1 / 3},
    }
    assert set(summary["offline"]) == {"2", "4"}
    for k, expected in expected_offline.items():
        assert summary["offline"][k] == pytest.approx(expected), k
    # Online, against the baseline of every trace decoded to the end (offline K = 4): 29/3
    # tokens and (4 + 2 + 0)/3 = 2 s per problem.
    assert summary["offline_seconds"] == pytest.approx(2.0)
    assert summary["online"]["deepconf-low"] == pytest.approx({
        "accuracy": 1 / 3, "tokens": 5.0, "launched": 11 / 3, "stopped": 2.0, "seconds": 0.5,
        "tokens_saved": 1 - 5 / (29 / 3),            # = 14/29
        "seconds_saved": 1 - 0.5 / 2.0})
    assert summary["online"]["deepconf-high"] == pytest.approx({
        "accuracy": 2 / 3, "tokens": 29 / 3, "launched": 4.0, "stopped": 0.0, "seconds": 2.0,
        "tokens_saved": 0.0, "seconds_saved": 0.0})
    assert 1 - 5 / (29 / 3) == pytest.approx(14 / 29)
    # AUROC, P(score of a right trace > score of a wrong one), ties 1/2.
    # Within a problem (C has no right trace: NaN, left out of the mean):
    #   mean:   A 7 vs {3, 3, 8}: 2/3;  B {3, 5} vs {6, 1}: 2/4  -> (2/3 + 1/2)/2 = 7/12
    #   lowest: A 2 vs {3, 3, 8}: 0;    B 1/2                      -> 1/4 (bottom alike)
    #   tail:   A 12 vs {3, 3, 8}: 1;   B 1/2                      -> 3/4
    # Pooled, 3 right against 9 wrong (A's three, B's two, C's four 2s):
    #   mean:   7 beats 8 of them, 3 beats 5 and ties 2, 5 beats 7: (8 + 6 + 7)/27 = 7/9
    #   lowest: 2 beats 1 and ties 4, 3: 6, 5: 7: (3 + 6 + 7)/27 = 16/27
    #   tail:   12 beats all 9, 3: 6, 5: 7: 22/27
    assert summary["auroc"] == {
        "mean": pytest.approx({"within_problem": 7 / 12, "pooled": 7 / 9}),
        "lowest_group": pytest.approx({"within_problem": 1 / 4, "pooled": 16 / 27}),
        "bottom_group": pytest.approx({"within_problem": 1 / 4, "pooled": 16 / 27}),
        "tail": pytest.approx({"within_problem": 3 / 4, "pooled": 22 / 27}),
    }


def test_summarize_without_the_full_budget_among_ks_has_no_token_saving(records):
    """tokens_saved needs the offline run at K = offline_traces; without it the figure is
    None rather than a saving against some other K."""
    cfg = deepconf.Config(window=2, tail=2, offline_traces=8, ks=(2, 4), warmup=4, batch=4)
    rows = [{"offline_seconds": 1.0, "offline": records[name],
             "online": {rule: {"correct": True, "tokens": 3, "launched": 4, "stopped": 0,
                               "seconds": 0.5} for rule in cfg.rules}} for name in ("A", "B")]
    summary = deepconf.summarize(rows, cfg)
    for rule in cfg.rules:
        assert summary["online"][rule]["tokens_saved"] is None
        assert summary["online"][rule]["seconds_saved"] == 0.5
    # A and B pooled, mean confidence: right {7, 3, 5} against wrong {3, 3, 8, 6, 1}:
    # 7 beats 4, 3 beats 1 and ties 2, 5 beats 3: (4 + 2 + 3)/15
    assert summary["auroc"]["mean"]["pooled"] == pytest.approx(9 / 15)
